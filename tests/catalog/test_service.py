"""Publishing on both databases: immutable versions with their SHA-256, all or nothing."""

from __future__ import annotations

import pytest

from keyshift.canonical import content_hash
from keyshift.catalog import loader
from keyshift.catalog import service as catalog
from keyshift.catalog.service import Manifest
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.errors import (
    EditionNotFound,
    InvalidInput,
    NotFound,
    PlanNotFound,
    VersionConflict,
)
from tests.catalog.helpers import EXAMPLES, count_rows, example_text

ACTOR = Actor(id="tester", scopes=frozenset({"admin"}))


async def publish(db: Database, manifests: list[Manifest]) -> list[catalog.PublishResult]:
    async with db.transaction() as session:
        return await catalog.publish(session, ACTOR, manifests)


async def test_publish_stores_every_version_with_the_sha256_of_its_canonical_content(
    db: Database,
) -> None:
    manifests = loader.load(EXAMPLES)
    results = await publish(db, manifests)
    assert all(r.created for r in results)
    assert len(results) == len(manifests) == 13
    async with db.transaction() as session:
        entries = await catalog.list_catalog(session)
        plans = await catalog.list_catalog(session, "plan")
    assert len(entries) == 13 and len(plans) == 7
    for entry in entries:
        assert entry.content_hash == content_hash(entry.content)
        assert len(entry.content_hash) == 64
        assert entry.published_by == "tester"
        assert entry.source_path and entry.source_path.endswith(".toml")
    by_ref = {r.ref: r.content_hash for r in results}
    assert by_ref["pro@2025"] == next(m for m in manifests if m.ref == "pro@2025").content_hash()
    assert await count_rows(db) == (13, 13)  # one audit event per version


async def test_republishing_identical_content_changes_nothing(db: Database) -> None:
    await publish(db, loader.load(EXAMPLES))
    before = await count_rows(db)
    again = await publish(db, loader.load(EXAMPLES))
    assert not any(r.created for r in again)
    assert await count_rows(db) == before


async def test_changed_content_under_a_published_version_is_refused_and_nothing_is_written(
    db: Database,
) -> None:
    await publish(db, loader.load(EXAMPLES / "editions"))
    before = await count_rows(db)
    changed = example_text("editions/pro-2025.toml").replace("limit = 250", "limit = 300")
    new_edition = example_text("editions/pro-2025.toml").replace('"2025"', '"2026"')
    # The new version comes first in the batch, so it would be written if publish were not
    # all-or-nothing.
    batch = [
        loader.load_text("editions/pro-2026.toml", new_edition),
        loader.load_text("editions/pro-2025.toml", changed),
    ]
    with pytest.raises(VersionConflict) as caught:
        await publish(db, batch)
    assert "pro@2025" in caught.value.message
    assert caught.value.field == "editions/pro-2025.toml: edition.version"
    assert await count_rows(db) == before
    async with db.transaction() as session:
        with pytest.raises(EditionNotFound):
            await catalog.get_edition(session, "pro@2026")
        edition, digest = await catalog.get_edition(session, "pro@2025")
    assert edition.quota_limits()["storage_gb"] == 250
    assert digest == loader.load(EXAMPLES / "editions" / "pro-2025.toml")[0].content_hash()


async def test_a_plan_naming_an_unknown_edition_is_refused(db: Database) -> None:
    plans = loader.load(EXAMPLES / "plans")
    with pytest.raises(EditionNotFound) as caught:
        await publish(db, plans)
    assert "not published" in caught.value.message
    assert caught.value.field is not None and caught.value.field.endswith("plan.edition")
    assert await count_rows(db) == (0, 0)


async def test_a_plan_may_name_an_edition_published_earlier(db: Database) -> None:
    await publish(db, loader.load(EXAMPLES / "editions"))
    results = await publish(db, loader.load(EXAMPLES / "plans"))
    assert {r.kind for r in results} == {"plan"} and all(r.created for r in results)
    async with db.transaction() as session:
        plan, digest = await catalog.get_plan(session, "pro-usage@2025")
        resolved = await catalog.entitlements_for(session, "pro-usage@2025", digest)
    assert plan.licensing.model == "usage"
    assert resolved.model == "usage" and resolved.edition_ref == "pro@2025"
    assert resolved.meters["api_calls"]["included"] == 600000
    assert resolved.features["bulk_import"].limit == 50


async def test_diff_reads_published_plans_and_editions(db: Database) -> None:
    await publish(db, loader.load(EXAMPLES))
    async with db.transaction() as session:
        plans = await catalog.diff(session, "pro-seat@2023", "pro-seat@2025")
        editions = await catalog.diff(session, "pro@2023", "pro@2025")
        forced = await catalog.diff(session, "edition:pro@2023", "edition:pro@2025")
    assert plans.kind == "plan"
    assert {c.field for c in plans.licensing} >= {"activation_mode", "max_activations"}
    assert editions.kind == "edition" and editions == forced
    assert [q.name for q in editions.quotas if q.is_lowered] == ["storage_gb"]


async def test_diff_refuses_unknown_refs_and_mixed_kinds(db: Database) -> None:
    await publish(db, loader.load(EXAMPLES))
    async with db.transaction() as session:
        with pytest.raises(NotFound) as missing:
            await catalog.diff(session, "pro@2023", "pro@2099")
        assert missing.value.field == "to"
        with pytest.raises(InvalidInput, match="two plans or two editions"):
            await catalog.diff(session, "pro@2023", "pro-seat@2025")
        with pytest.raises(InvalidInput):
            await catalog.diff(session, "pro", "pro@2025")
        with pytest.raises(InvalidInput):
            await catalog.diff(session, "bundle:pro@2023", "pro@2025")


async def test_lookups_of_unknown_entries_are_not_found(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(PlanNotFound):
            await catalog.get_entry(session, "plan", "pro-seat@2025")
        with pytest.raises(EditionNotFound):
            await catalog.get_entry(session, "edition", "pro@2025")
        with pytest.raises(InvalidInput):
            await catalog.get_entry(session, "bundle", "pro@2025")
        with pytest.raises(InvalidInput):
            await catalog.get_edition(session, "not a ref")
        with pytest.raises(InvalidInput):
            await catalog.list_catalog(session, "bundle")
