"""Whose usage it is: an account (a service recording for it) or the license presenting a
key (a client application), with the period anchor and what the account's plan meters."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.accounts import service as accounts
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements, with_overrides
from keyshift.context import Actor
from keyshift.db.tables import License, Migration, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import Conflict, LicenseNotActive, LicenseNotFound
from keyshift.licensing import service as licensing
from keyshift.metering.errors import UnknownMeter
from keyshift.metering.meters import MeterSpec, meter_specs
from keyshift.metering.periods import Period
from keyshift.security.keyring import Keyring
from keyshift.states import CUT_OVER


@dataclass(frozen=True)
class Subject:
    """Whose usage it is: the account, the license that reported it (if any), the period
    anchor and what its plan meters."""

    account_id: str
    license_id: str | None
    anchor: datetime
    entitlements: Entitlements
    #: When the account's plan last changed (None: unknown); events older than this may
    #: belong to the plan before (``as_of``).
    plan_changed_at: datetime | None = None

    @cached_property
    def specs(self) -> dict[str, MeterSpec]:
        return meter_specs(self.entitlements)

    def spec(self, meter: str, field: str = "meter") -> MeterSpec:
        spec = self.specs.get(meter)
        if spec is None:
            raise UnknownMeter(
                f"the plan {self.entitlements.plan_ref} has no meter {meter!r}", field=field
            )
        return spec

    def period(self, spec: MeterSpec, when: datetime) -> Period:
        return spec.period(self.anchor, when, self.entitlements.term)


async def _subject_of_account(
    session: AsyncSession, account_id: str, license_id: str | None
) -> Subject:
    await accounts.get_account(session, account_id)
    subscription = await session.get(Subscription, account_id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    ref = f"{subscription.plan_key}@{subscription.plan_version}"
    entitlements = await catalog.entitlements_for(session, ref, subscription.plan_hash)
    # The account's own allowances (e.g. included units a seat → usage migration set).
    entitlements = with_overrides(entitlements, subscription.overrides or {}, None, utcnow())
    return Subject(
        account_id, license_id, subscription.started_at, entitlements, subscription.updated_at
    )


async def as_of(session: AsyncSession, subject: Subject, when: datetime) -> Subject:
    """The subject as it was at ``when``: an event that happened before a migration's cutover
    but arrives after it counts under the plan it happened in (if that plan meters it).

    Cheap for the common case: only an event older than the subscription's last change looks
    for a cutover after it."""
    if subject.plan_changed_at is None or when >= subject.plan_changed_at:
        return subject
    row = (
        await session.execute(
            select(Migration.source_ref, Migration.source_hash, Migration.snapshot)
            .where(
                Migration.account_id == subject.account_id,
                Migration.cutover_at > when,
                Migration.state.in_(CUT_OVER),
            )
            .order_by(Migration.cutover_at)
            .limit(1)
        )
    ).first()
    if row is None or row.source_ref is None or row.source_hash is None:
        return subject
    before = await catalog.entitlements_for(session, row.source_ref, row.source_hash)
    overrides = ((row.snapshot or {}).get("subscription") or {}).get("overrides") or {}
    before = with_overrides(before, overrides, None, when)
    return replace(subject, entitlements=before, plan_changed_at=None)


async def subject_for_account(session: AsyncSession, account_id: str) -> Subject:
    return await _subject_of_account(session, account_id, None)


#: The license presenting a key and its account's subscription, in one statement (the usage
#: path runs it on every key-authenticated request).
_KEY_SUBJECT = (
    select(
        License.id,
        License.account_id,
        License.status,
        License.expires_at,
        Subscription.plan_key,
        Subscription.plan_version,
        Subscription.plan_hash,
        Subscription.started_at,
        Subscription.updated_at,
        Subscription.overrides,
    )
    .select_from(License)
    .outerjoin(Subscription, Subscription.account_id == License.account_id)
    .where(License.key_lookup == bindparam("lookup"))
)


async def subject_for_key(
    session: AsyncSession, keyring: Keyring, key: str, now: datetime | None = None
) -> Subject:
    """The license presenting ``key``; it must be usable (active, or expired within grace)."""
    lookup = licensing.lookup_for(keyring, key)
    row = (await session.execute(_KEY_SUBJECT, {"lookup": lookup})).first()
    if row is None:
        raise LicenseNotFound("no license has this key", field="key")
    if row.plan_key is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    ref = f"{row.plan_key}@{row.plan_version}"
    entitlements = await catalog.entitlements_for(session, ref, row.plan_hash)
    entitlements = with_overrides(entitlements, row.overrides or {}, None, utcnow())
    subject = Subject(row.account_id, row.id, row.started_at, entitlements, row.updated_at)
    standing = licensing.standing(row, subject.entitlements.grace_seconds, now or utcnow())
    if not licensing.is_usable(standing):
        raise LicenseNotActive(f"the license is {standing}; it cannot record usage", field="key")
    return subject


def key_actor(subject: Subject, request_id: str | None = None) -> Actor:
    return Actor(id=f"license:{subject.license_id}", request_id=request_id)
