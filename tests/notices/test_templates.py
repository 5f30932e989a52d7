"""Templates a vendor edits: an unknown variable is refused at upload naming it (and the
refusal audited, nothing stored); a stored template is what the next delivery says."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, NoticeTemplate
from keyshift.migration.executor import Executor
from keyshift.notices import service, templates
from keyshift.notices.errors import TemplateInvalid
from keyshift.notices.kinds import NoticeKind
from keyshift.security.keyring import Keyring
from keyshift.security.rotation import reencrypt_licenses
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.notices.receiver import always, receiving


def test_an_unknown_variable_is_named() -> None:
    with pytest.raises(TemplateInvalid) as refused:
        templates.check(NoticeKind.COMPLETED, "Done for $account_name", "Paid $amount_due by $date")
    assert refused.value.field == "body"
    assert refused.value.details["variable"] == "amount_due"
    assert "unknown variable $amount_due" in refused.value.message


def test_a_variable_of_another_kind_is_unknown_here() -> None:
    templates.check(NoticeKind.SCHEDULED, "On $date", "$changes")
    with pytest.raises(TemplateInvalid, match=r"\$changes"):
        templates.check(NoticeKind.STARTED, "On $date", "$changes")


@pytest.mark.parametrize(
    ("subject", "body", "field"),
    [
        ("Hi", "costs $5", "body"),
        ("", "x", "subject"),
        ("${date", "x", "subject"),
        ("Hi", "nul \x00 here", "body"),
    ],
)
def test_malformed_templates_are_refused(subject: str, body: str, field: str) -> None:
    with pytest.raises(TemplateInvalid) as refused:
        templates.check(NoticeKind.STARTED, subject, body)
    assert refused.value.field == field


def test_every_built_in_template_passes_its_own_check() -> None:
    for kind, text in templates.DEFAULTS.items():
        assert templates.check(kind, text.subject, text.body) == text


def test_rendering_cannot_reach_into_values() -> None:
    text = templates.check(NoticeKind.STARTED, "$account_name", "$$date is ${date}")
    out = templates.render(NoticeKind.STARTED, text, {"account_name": "A", "date": "D"})
    assert (out.subject, out.body) == ("A", "$date is D")


async def test_a_refused_upload_stores_nothing_and_is_audited(db: Database) -> None:
    with pytest.raises(TemplateInvalid):
        await service.set_template(db, SYSTEM, NoticeKind.COMPLETED, "S", "$nope")
    async with db.transaction() as session:
        assert (await session.execute(select(NoticeTemplate))).scalars().all() == []
        [event] = (
            await session.execute(
                select(AuditEvent).where(AuditEvent.action == "notice.template.refused")
            )
        ).scalars()
    assert event.details["field"] == "body" and "$nope" in event.details["reason"]


async def test_the_vendors_text_is_what_the_customer_reads(db: Database, secrets: Secrets) -> None:
    await service.set_template(
        db, SYSTEM, NoticeKind.COMPLETED, "Welcome to $to_plan", "Hello $account_name ($date)"
    )
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    await Executor(db, secrets.signing).apply(SYSTEM, migration.rules(), account_id)
    with receiving(always()) as receiver:
        secret = await helpers.endpoint(db, secrets, receiver.url)
        await helpers.settle(helpers.deliverer(db, secrets), db)
        bodies = receiver.verified(secret)
    [completed] = [b["data"] for b in bodies if b["data"]["kind"] == "completed"]
    assert completed["subject"] == "Welcome to new-seat@1"
    assert completed["message"].startswith("Hello Migrating Co (")
    [started] = [b["data"] for b in bodies if b["data"]["kind"] == "started"]
    assert started["subject"] == templates.DEFAULTS[NoticeKind.STARTED].subject

    await service.reset_template(db, SYSTEM, NoticeKind.COMPLETED)
    async with db.transaction() as session:
        texts = await service.texts(session)
    assert texts[NoticeKind.COMPLETED] == templates.DEFAULTS[NoticeKind.COMPLETED]


async def test_the_endpoint_secret_moves_to_a_rotated_key_with_the_license_keys(
    db: Database, secrets: Secrets
) -> None:
    """Sealed at rest like a license key, and re-encrypted with them: after the rotation a
    keyring holding only the new key opens it."""
    _, secret = await service.set_endpoint(db, secrets.keyring, SYSTEM, "http://127.0.0.1:9/h")
    rotated = secrets.keyring.rotated()
    await reencrypt_licenses(db, rotated, SYSTEM)
    only_new = Keyring(
        active=rotated.active,
        keys={rotated.active: rotated.keys[rotated.active]},
        lookup_key=rotated.lookup_key,
    )
    async with db.transaction() as session:
        endpoint = await service.load_endpoint(session, only_new)
    assert endpoint is not None and endpoint.secret == secret
