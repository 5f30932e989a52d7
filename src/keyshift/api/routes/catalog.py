"""Catalog: publish manifests as immutable versions, list and read them, diff two versions."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import ConfigDict, Field

from keyshift.api.deps import Session, require
from keyshift.api.schemas import Ref, Request, Response
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
    published_at: datetime
    published_by: str
    source_path: str | None


class EntryWithContent(EntryOut):
    content: dict[str, Any]


def _entry(entry: CatalogEntry, *, with_content: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": entry.kind,
        "ref": f"{entry.key}@{entry.version}",
        "content_hash": entry.content_hash,
        "published_at": entry.published_at,
        "published_by": entry.published_by,
        "source_path": entry.source_path,
    }
    if with_content:
        body["content"] = entry.content
    return body


@router.post("/publish", status_code=201, response_model=PublishOut)
async def publish(body: PublishRequest, actor: Writer, session: Session) -> dict[str, Any]:
    """Validate every file, then store them all as immutable versions, or store nothing."""
    manifests = loader.load_texts(body.files)
    results = await catalog.publish(session, actor, manifests)
    return {"results": [asdict(r) for r in results]}


@router.get("", response_model=list[EntryOut])
async def list_catalog(
    _actor: Reader, session: Session, kind: Literal["edition", "plan"] | None = None
) -> list[dict[str, Any]]:
    return [_entry(e) for e in await catalog.list_catalog(session, kind)]


@router.get("/diff")
async def diff(
    _actor: Reader,
    session: Session,
    from_ref: Annotated[Ref, Query(alias="from")],
    to_ref: Annotated[Ref, Query(alias="to")],
) -> dict[str, Any]:
    """Features and quotas gained, lost and changed (and licensing terms, for plans)."""
    return (await catalog.diff(session, from_ref, to_ref)).to_dict()


@router.get("/{kind}/{ref}", response_model=EntryWithContent)
async def get_entry(
    kind: Literal["edition", "plan"], ref: Annotated[Ref, Path()], _actor: Reader, session: Session
) -> dict[str, Any]:
    return _entry(await catalog.get_entry(session, kind, ref), with_content=True)
