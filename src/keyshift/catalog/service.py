"""Catalog operations: publish immutable versions, look them up, resolve entitlements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.canonical import content_hash
from keyshift.catalog import repository
from keyshift.catalog.diff import CatalogDiff, diff_editions, diff_plans
from keyshift.catalog.entitlements import Entitlements, resolve
from keyshift.catalog.manifests import Edition, Plan, parse_ref
from keyshift.context import Actor
from keyshift.db.tables import CatalogEntry
from keyshift.errors import (
    EditionNotFound,
    InvalidInput,
    NotFound,
    PlanNotFound,
    VersionConflict,
)

Kind = Literal["edition", "plan"]
KINDS: tuple[Kind, ...] = ("plan", "edition")


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
    """A published edition and its content hash."""
    try:
        key, version = parse_ref(ref)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="edition") from exc
    entry = await repository.get_entry(session, "edition", key, version)
    if entry is None:
        raise EditionNotFound(f"no published edition {ref}", field="edition")
    return Edition.model_validate(entry.content), entry.content_hash


# Published versions never change, so their resolution can be cached for the process's life.
_ENTITLEMENTS: dict[tuple[str, str], Entitlements] = {}


def cached_entitlements(plan_ref: str, plan_hash: str) -> Entitlements | None:
    """The entitlements of a plan version if this process has resolved them already."""
    return _ENTITLEMENTS.get((plan_ref, plan_hash))


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


async def list_catalog(session: AsyncSession, kind: str | None = None) -> list[CatalogEntry]:
    """Every published version (of one ``kind`` if given), by kind, key and publication order."""
    if kind is not None and kind not in KINDS:
        raise InvalidInput(f"kind must be 'edition' or 'plan', not {kind!r}", field="kind")
    return await repository.list_entries(session, kind)


async def get_entry(session: AsyncSession, kind: str, ref: str) -> CatalogEntry:
    """One published version, with its stored content."""
    if kind not in KINDS:
        raise InvalidInput(f"kind must be 'edition' or 'plan', not {kind!r}", field="kind")
    try:
        key, version = parse_ref(ref)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="ref") from exc
    entry = await repository.get_entry(session, kind, key, version)
    if entry is None:
        missing = PlanNotFound if kind == "plan" else EditionNotFound
        raise missing(f"no published {kind} {ref}", field="ref")
    return entry


async def _candidates(session: AsyncSession, ref: str, field: str) -> dict[Kind, CatalogEntry]:
    """The published entries ``ref`` may mean: ``plan:x@1`` / ``edition:x@1``, or either."""
    prefix, _, bare = ref.rpartition(":")
    kinds: tuple[Kind, ...] = KINDS
    if prefix:
        if prefix not in KINDS:
            raise InvalidInput(f"{ref!r}: the prefix must be 'plan:' or 'edition:'", field=field)
        kinds = (prefix,)
    try:
        key, version = parse_ref(bare)
    except ValueError as exc:
        raise InvalidInput(str(exc), field=field) from exc
    found: dict[Kind, CatalogEntry] = {}
    for kind in kinds:
        entry = await repository.get_entry(session, kind, key, version)
        if entry is not None:
            found[kind] = entry
    if not found:
        what = " or ".join(kinds)
        raise NotFound(f"no published {what} {bare}", field=field)
    return found


async def diff(session: AsyncSession, from_ref: str, to_ref: str) -> CatalogDiff:
    """What changes from one published version to another. Both refs are plans (the diff then
    covers licensing too) or both editions; ``plan:``/``edition:`` prefixes settle ambiguity."""
    old, new = (
        await _candidates(session, from_ref, "from"),
        await _candidates(session, to_ref, "to"),
    )
    common = [kind for kind in KINDS if kind in old and kind in new]
    if not common:
        raise InvalidInput(
            f"cannot diff {next(iter(old))} {from_ref} against {next(iter(new))} {to_ref}; "
            "compare two plans or two editions",
            field="to",
        )
    kind = common[0]
    if kind == "plan":
        old_entry, new_entry = old["plan"], new["plan"]
        return diff_plans(
            await entitlements_for(session, _ref(old_entry), old_entry.content_hash),
            await entitlements_for(session, _ref(new_entry), new_entry.content_hash),
        )
    return diff_editions(
        Edition.model_validate(old["edition"].content),
        Edition.model_validate(new["edition"].content),
    )


def _ref(entry: CatalogEntry) -> str:
    return f"{entry.key}@{entry.version}"
