"""Catalog operations: publish immutable versions, look them up, resolve entitlements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.canonical import content_hash
from keyshift.catalog import repository
from keyshift.catalog.entitlements import Entitlements, resolve
from keyshift.catalog.manifests import Edition, Plan, parse_ref
from keyshift.context import Actor
from keyshift.db.tables import CatalogEntry
from keyshift.errors import EditionNotFound, InvalidInput, PlanNotFound, VersionConflict


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest with where it came from."""

    kind: Literal["edition", "plan"]
    model: Edition | Plan
    source: str = ""

    @property
    def key(self) -> str:
        header = self.model.edition if isinstance(self.model, Edition) else self.model.plan
        return header.key

    @property
    def version(self) -> str:
        header = self.model.edition if isinstance(self.model, Edition) else self.model.plan
        return header.version

    @property
    def ref(self) -> str:
        return f"{self.key}@{self.version}"

    def content(self) -> dict[str, object]:
        return self.model.model_dump(mode="json")

    def content_hash(self) -> str:
        return content_hash(self.content())


@dataclass(frozen=True)
class PublishResult:
    ref: str
    kind: str
    content_hash: str
    created: bool  # False: this exact content was already published


async def publish(
    session: AsyncSession, actor: Actor, manifests: list[Manifest]
) -> list[PublishResult]:
    """Store each manifest as an immutable version, all or nothing.

    Re-publishing identical content is a no-op; different content under an existing
    ``key@version`` is refused. A plan must name an edition that is published or in this batch.
    """
    results: list[PublishResult] = []
    batch_editions = {m.ref for m in manifests if m.kind == "edition"}
    for manifest in manifests:
        digest = manifest.content_hash()
        existing = await repository.get_entry(
            session, manifest.kind, manifest.key, manifest.version
        )
        if existing is not None:
            if existing.content_hash != digest:
                raise VersionConflict(
                    f"{manifest.kind} {manifest.ref} is already published with different content "
                    f"(sha256 {existing.content_hash[:12]}…); publish a new version instead",
                    field=f"{manifest.source or manifest.ref}: {manifest.kind}.version",
                )
            results.append(PublishResult(manifest.ref, manifest.kind, digest, created=False))
            continue
        if isinstance(manifest.model, Plan):
            edition_ref = manifest.model.plan.edition
            if edition_ref not in batch_editions:
                key, version = parse_ref(edition_ref)
                if await repository.get_entry(session, "edition", key, version) is None:
                    raise EditionNotFound(
                        f"plan {manifest.ref} names edition {edition_ref}, which is not published",
                        field=f"{manifest.source or manifest.ref}: plan.edition",
                    )
        session.add(
            CatalogEntry(
                kind=manifest.kind,
                key=manifest.key,
                version=manifest.version,
                content_hash=digest,
                content=manifest.content(),
                source_path=manifest.source or None,
                published_by=actor.id,
            )
        )
        results.append(PublishResult(manifest.ref, manifest.kind, digest, created=True))
    created = [r for r in results if r.created]
    if created:
        await session.flush()
        await audit.record_many(
            session,
            actor,
            [
                audit.EventIn(
                    "catalog.publish", r.kind, r.ref, details={"content_hash": r.content_hash}
                )
                for r in created
            ],
        )
    return results


async def get_plan(session: AsyncSession, ref: str) -> tuple[Plan, str]:
    """A published plan and its content hash."""
    try:
        key, version = parse_ref(ref)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="plan") from exc
    entry = await repository.get_entry(session, "plan", key, version)
    if entry is None:
        raise PlanNotFound(f"no published plan {ref}", field="plan")
    return Plan.model_validate(entry.content), entry.content_hash


async def get_edition(session: AsyncSession, ref: str) -> tuple[Edition, str]:
    key, version = parse_ref(ref)
    entry = await repository.get_entry(session, "edition", key, version)
    if entry is None:
        raise EditionNotFound(f"no published edition {ref}", field="edition")
    return Edition.model_validate(entry.content), entry.content_hash


# Published versions never change, so their resolution can be cached for the process's life.
_ENTITLEMENTS: dict[tuple[str, str], Entitlements] = {}


async def entitlements_for(session: AsyncSession, plan_ref: str, plan_hash: str) -> Entitlements:
    """The entitlements of a published plan version (cached by content hash)."""
    cached = _ENTITLEMENTS.get((plan_ref, plan_hash))
    if cached is not None:
        return cached
    plan, digest = await get_plan(session, plan_ref)
    edition, _ = await get_edition(session, plan.plan.edition)
    resolved = resolve(plan, digest, edition)
    if digest == plan_hash:
        _ENTITLEMENTS[(plan_ref, plan_hash)] = resolved
    return resolved
