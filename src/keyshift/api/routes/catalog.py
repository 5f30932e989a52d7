"""Catalog: publish manifests as immutable versions, list and read them, diff two versions."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query
from pydantic import ConfigDict, Field

from keyshift.api.deps import Session, require
from keyshift.api.schemas import Instant, Ref, Request, Response
from keyshift.catalog import loader
from keyshift.catalog import service as catalog
from keyshift.context import Actor
from keyshift.db.tables import CatalogEntry

router = APIRouter(prefix="/v1/catalog", tags=["catalog"])
Reader = Annotated[Actor, Depends(require("catalog:read"))]
Writer = Annotated[Actor, Depends(require("catalog:write"))]

MAX_FILES = 200
FileName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._/ -]+$")]
FileText = Annotated[str, Field(max_length=loader.MAX_FILE_BYTES)]


class PublishRequest(Request):
    # The texts are TOML: stripping whitespace would shift the line numbers problems report.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    files: dict[FileName, FileText] = Field(
        min_length=1,
        max_length=MAX_FILES,
        description="Manifest files by name (e.g. `editions/pro.toml`) → TOML text.",
    )


class PublishedOut(Response):
    ref: str
    kind: str
    content_hash: str
    created: bool = Field(description="False: this exact content was already published.")


class PublishOut(Response):
    results: list[PublishedOut]


class EntryOut(Response):
    kind: str
    ref: str
    content_hash: str
    published_at: Instant
    published_by: str
    source_path: str | None


class EntryWithContent(EntryOut):
    content: dict[str, Any]


class Changes(Response):
    gained: list[dict[str, Any]]
    lost: list[dict[str, Any]]
    changed: list[dict[str, Any]]


class DiffOut(Response):
    """``CatalogDiff.to_dict()``: what differs from one version to the other."""

    kind: Literal["edition", "plan"]
    source: str = Field(alias="from")
    target: str = Field(alias="to")
    features: Changes
    quotas: Changes
    licensing: list[dict[str, Any]]
    meters: list[dict[str, Any]]


_Entry = TypeVar("_Entry", bound=EntryOut)


def _entry(model: type[_Entry], entry: CatalogEntry) -> _Entry:
    """The entry as ``model`` shows it (``EntryOut`` leaves the content out)."""
    return model.model_validate(
        {
            "kind": entry.kind,
            "ref": f"{entry.key}@{entry.version}",
            "content_hash": entry.content_hash,
            "published_at": entry.published_at,
            "published_by": entry.published_by,
            "source_path": entry.source_path,
            "content": entry.content,
        }
    )


@router.post("/publish", status_code=201)
async def publish(body: PublishRequest, actor: Writer, session: Session) -> PublishOut:
    """Validate every file, then store them all as immutable versions, or store nothing."""
    manifests = loader.load_texts(body.files)
    results = await catalog.publish(session, actor, manifests)
    return PublishOut.model_validate({"results": [asdict(r) for r in results]})


@router.get("")
async def list_catalog(
    _actor: Reader, session: Session, kind: Literal["edition", "plan"] | None = None
) -> list[EntryOut]:
    return [_entry(EntryOut, e) for e in await catalog.list_catalog(session, kind)]


@router.get("/diff")
async def diff(
    _actor: Reader,
    session: Session,
    from_ref: Annotated[Ref, Query(alias="from")],
    to_ref: Annotated[Ref, Query(alias="to")],
) -> DiffOut:
    """Features and quotas gained, lost and changed (and licensing terms, for plans)."""
    return DiffOut.model_validate((await catalog.diff(session, from_ref, to_ref)).to_dict())


@router.get("/{kind}/{ref}")
async def get_entry(
    kind: Literal["edition", "plan"], ref: Annotated[Ref, Path()], _actor: Reader, session: Session
) -> EntryWithContent:
    return _entry(EntryWithContent, await catalog.get_entry(session, kind, ref))
