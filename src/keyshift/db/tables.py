"""The SQLAlchemy models. Every table that belongs to an account carries ``account_id``.

The schema itself is owned by Alembic (``db/alembic/versions``); these models must match it,
which ``tests/db/test_schema.py`` checks.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from keyshift.db.types import JSONDocument, JSONType, UTCDateTime, utcnow
from keyshift.states import MigrationState, Step, StepOutcome

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def stored_as_text(enum: type[StrEnum], length: int) -> Enum:
    """A column of ``enum``'s values in the plain VARCHAR(length) it always was: the same
    strings stored, no CHECK constraint, no native enum type (no schema change), read back as
    members."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        values_callable=lambda members: [m.value for m in members],
        length=length,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONType}


class CatalogEntry(Base):
    """One published, immutable edition or plan version (``key@version``)."""

    __tablename__ = "catalog_entries"
    __table_args__ = (UniqueConstraint("kind", "key", "version", name="uq_catalog_entries_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # "edition" | "plan"
    key: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(64))
    content: Mapped[dict[str, Any]] = mapped_column(JSONType)
    source_path: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_by: Mapped[str] = mapped_column(String(200))


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    external_ref: Mapped[str | None] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    preferences: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Subscription(Base):
    """The account's one current plan version. ``entitlements_version`` bumps on every change."""

    __tablename__ = "subscriptions"

    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    plan_key: Mapped[str] = mapped_column(String(64))
    plan_version: Mapped[str] = mapped_column(String(32))
    plan_hash: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    entitlements_version: Mapped[int] = mapped_column(Integer, default=1)
    #: What this account has beyond its plan: ``addons``, ``meters`` (included quantities set by
    #: a seat → usage conversion), ``read_only`` quotas and a ``grace`` with the old entitlements.
    overrides: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class License(Base):
    """A license key: stored encrypted (``key_ciphertext``), found by HMAC (``key_lookup``)."""

    __tablename__ = "licenses"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    key_lookup: Mapped[str] = mapped_column(String(64), unique=True)
    key_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_kid: Mapped[str] = mapped_column(String(32))
    key_hint: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="active")
    expires_at: Mapped[datetime | None] = mapped_column()
    max_activations_override: Mapped[int | None] = mapped_column(Integer)
    overrides: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Activation(Base):
    """A machine bound to a license: node-locked (no lease) or floating (a lease with a TTL)."""

    __tablename__ = "activations"
    __table_args__ = (
        UniqueConstraint("license_id", "fingerprint", name="uq_activations_license_fingerprint"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    license_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("licenses.id", ondelete="CASCADE"), index=True
    )
    fingerprint: Mapped[str] = mapped_column(String(255))
    mode: Mapped[str] = mapped_column(String(16))  # "node" | "floating"
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token for admin and service calls; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[dict[str, Any]] = mapped_column(JSONType)  # {"scopes": [...]}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit log."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_account", "account_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    occurred_at: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    target_type: Mapped[str] = mapped_column(String(50))
    target_id: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str | None] = mapped_column(String(36))
    request_id: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's single head row: writers lock it, so the chain never forks."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


# -- usage (metering) --------------------------------------------------------------------------


class UsageEvent(Base):
    """One accepted usage event: the history, and the memory of its idempotency key.

    ``idempotency_key`` is released (set to NULL) once ``idempotency_expires_at`` has passed
    and the key is used again (or ``keyshift usage prune`` runs); the event itself is kept.

    The answer the first request got is rebuilt from the row (``metering.service.answer``):
    ``counted`` … ``notices`` hold what the rest of the row cannot say. ``response`` is the
    whole answer as stored before revision 0004, NULL since. ``id`` is a UUIDv7, so the
    history's primary key grows at its right edge.
    """

    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key", name="uq_usage_events_idempotency"),
        Index("ix_usage_events_history", "account_id", "meter", "period_start", "occurred_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    license_id: Mapped[str | None] = mapped_column(String(36))
    meter: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[int] = mapped_column(BigInteger)
    member_hash: Mapped[str | None] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column()
    received_at: Mapped[datetime] = mapped_column()
    period_start: Mapped[datetime] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_expires_at: Mapped[datetime] = mapped_column()
    request_hash: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    counted: Mapped[int | None] = mapped_column(BigInteger)  # what the event added
    used: Mapped[int | None] = mapped_column(BigInteger)  # the counter after it
    included: Mapped[int | None] = mapped_column(BigInteger)
    policy: Mapped[str | None] = mapped_column(String(16))
    period_end: Mapped[datetime | None] = mapped_column()  # None: the period never ends
    overage_flagged: Mapped[bool | None] = mapped_column()
    notices: Mapped[str | None] = mapped_column(Text)  # thresholds crossed: "80,100"
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # rows before 0004


class UsageCounter(Base):
    """A meter's running total for one period; moved only by deltas under a row lock."""

    __tablename__ = "usage_counters"

    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    period_end: Mapped[datetime] = mapped_column()
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageUniqueMember(Base):
    """A distinct member (hashed) seen by a ``unique`` meter in one period."""

    __tablename__ = "usage_unique_members"

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    member_hash: Mapped[str] = mapped_column(String(64), primary_key=True)


class UsageNotice(Base):
    """A threshold (``kind`` "threshold", percent) or overage flag ("overage", 0) that has
    fired for a meter in a period: its primary key makes each fire once."""

    __tablename__ = "usage_notices"

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    threshold: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    used: Mapped[int] = mapped_column(BigInteger)
    fired_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- account data objects ----------------------------------------------------------------------


class DataObject(Base):
    """A piece of an account's data that counts against a quota (``units`` of ``quota``), kept in
    a storage ``tier``. A migration that archives it copies it (same content, hash verified) to
    the archive tier and marks the original ``superseded``; the original is deleted only when
    the migration is finalized."""

    __tablename__ = "data_objects"
    __table_args__ = (Index("ix_data_objects_account", "account_id", "quota", "state"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    quota: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    units: Mapped[int] = mapped_column(BigInteger)
    tier: Mapped[str] = mapped_column(String(16), default="standard")  # standard | archive
    state: Mapped[str] = mapped_column(String(16), default="active")  # active|staged|superseded
    content: Mapped[bytes] = mapped_column(LargeBinary)
    content_hash: Mapped[str] = mapped_column(String(64))
    migration_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- migrations --------------------------------------------------------------------------------


class MigrationRulesVersion(Base):
    """A migration rules manifest as used: immutable, by ``key@version`` and content hash."""

    __tablename__ = "migration_rules"
    __table_args__ = (UniqueConstraint("key", "version", name="uq_migration_rules_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(64))
    content: Mapped[dict[str, Any]] = mapped_column(JSONType)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_by: Mapped[str] = mapped_column(String(200))


class Migration(Base):
    """One account's migration: its rules and plans by content hash, its state, its snapshot.

    ``lock_account_id`` equals ``account_id`` while the migration holds the account (from the
    lock step until it completes, rolls back or fails) and is NULL otherwise: its UNIQUE
    constraint is the database's guarantee of one migration per account at a time.
    """

    __tablename__ = "migrations"
    __table_args__ = (Index("ix_migrations_account", "account_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    lock_account_id: Mapped[str | None] = mapped_column(String(36), unique=True)
    state: Mapped[MigrationState] = mapped_column(stored_as_text(MigrationState, 16))
    rules_ref: Mapped[str] = mapped_column(String(100))
    rules_hash: Mapped[str] = mapped_column(String(64))
    source_ref: Mapped[str | None] = mapped_column(String(100))
    source_hash: Mapped[str | None] = mapped_column(String(64))
    target_ref: Mapped[str] = mapped_column(String(100))
    target_hash: Mapped[str] = mapped_column(String(64))
    effective_at: Mapped[datetime | None] = mapped_column()
    outcome_digest: Mapped[str | None] = mapped_column(String(64))
    snapshot: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    snapshot_hash: Mapped[str | None] = mapped_column(String(64))
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    receipt: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    cutover_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    #: The run this migration belongs to (NULL for a one-off ``migrate apply``).
    run_id: Mapped[str | None] = mapped_column(String(36), index=True)


class MigrationStep(Base):
    """The ledger: one row per step of one migration, committed with the step's effect.

    The primary key (migration, step) is the step's deterministic key: a replayed step finds
    its row and changes nothing.
    """

    __tablename__ = "migration_ledger"

    migration_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("migrations.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[Step] = mapped_column(stored_as_text(Step, 32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[StepOutcome] = mapped_column(stored_as_text(StepOutcome, 16))
    snapshot_hash: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


# -- runs --------------------------------------------------------------------------------------


class MigrationRun(Base):
    """Rules x a cohort of accounts, moved as one operation (docs/runs.md).

    ``report_hash`` pins what the dry-run report was computed against (the rules and every
    plan they name, by content hash); approval copies it, and a start whose hashes differ
    now is refused.
    """

    __tablename__ = "migration_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(16))  # progressive | blue_green
    #: What workers do now: ``migrate`` (progressive), ``prepare`` then ``flip`` (blue-green).
    phase: Mapped[str] = mapped_column(String(16))
    rules_ref: Mapped[str] = mapped_column(String(100))
    rules_hash: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[dict[str, Any]] = mapped_column(JSONType)
    options: Mapped[dict[str, Any]] = mapped_column(JSONType)
    total: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    report_hash: Mapped[str | None] = mapped_column(String(64))
    approved_hash: Mapped[str | None] = mapped_column(String(64))
    #: Why the run stopped by itself (a failure rate over its threshold, a canary difference).
    halted_reason: Mapped[str | None] = mapped_column(Text)
    #: The shared rate limit: the earliest moment the next claimed account may start.
    rate_cursor: Mapped[datetime | None] = mapped_column()
    #: Blue-green: the cutoff moment, the effective time on every account's receipt.
    cutoff_at: Mapped[datetime | None] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(200))
    approved_by: Mapped[str | None] = mapped_column(String(200))
    approved_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class RunAccount(Base):
    """One account of a run: the queue entry workers claim, and its outcome.

    ``hold_account_id`` equals ``account_id`` while the run is active (draft to completed) and
    is NULL once the run ends: its UNIQUE constraint keeps an account in at most one active
    run, as ``migrations.lock_account_id`` keeps it in one migration.
    """

    __tablename__ = "run_accounts"
    __table_args__ = (
        Index("ix_run_accounts_queue", "run_id", "state", "wave", "priority", "position"),
    )

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("migration_runs.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    hold_account_id: Mapped[str | None] = mapped_column(String(36), unique=True)
    position: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    #: The dry-run's verdict and outcome digest; a claim that plans differently holds the account.
    verdict: Mapped[str | None] = mapped_column(String(16))
    expected_digest: Mapped[str | None] = mapped_column(String(64))
    migration_id: Mapped[str | None] = mapped_column(String(36))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str | None] = mapped_column(String(36))
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    done_at: Mapped[datetime | None] = mapped_column()


# -- customer notices --------------------------------------------------------------------------


class Notice(Base):
    """The outbox: one notice to a customer, written in the transaction of the change it
    announces and delivered later as a signed webhook (``keyshift.notices``).

    ``key`` is the notice's deterministic key (kind and what it is about): a replayed step
    or announcement inserts nothing twice. A deliverer claims a due row by setting
    ``lease_until``; ``attempts``, ``last_status`` and ``last_error`` say how its
    deliveries went. No foreign key to ``accounts``: inserting one takes no lock on the
    account's row, and an account's notice history outlives it.
    """

    __tablename__ = "notices"
    __table_args__ = (
        Index("ix_notices_account", "account_id", "created_at"),
        Index("ix_notices_due", "state", "next_attempt_at"),
        Index("ix_notices_migration", "migration_id"),
        Index("ix_notices_run", "run_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    account_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    migration_id: Mapped[str | None] = mapped_column(String(36))
    run_id: Mapped[str | None] = mapped_column(String(36))
    #: The template's variables (and, for ``completed``, the signed receipt).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: When it is next due: not before its announced moment, then after each backoff.
    next_attempt_at: Mapped[datetime] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column()
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()


class NoticeEndpoint(Base):
    """The vendor's webhook endpoint (one row, ``id`` 1): its URL and its signing secret,
    sealed with the keyring (AES-256-GCM, the row's id as associated data)."""

    __tablename__ = "notice_endpoints"
    #: The associated data the secret is sealed with (its row).
    SECRET_CONTEXT: ClassVar[bytes] = b"notice_endpoint:1"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    url: Mapped[str] = mapped_column(String(2000))
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    secret_kid: Mapped[str] = mapped_column(String(32))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))


class NoticeTemplate(Base):
    """A vendor's text for one kind of notice (``subject`` and ``body``, ``$variable``
    placeholders); a kind without a row uses the built-in text."""

    __tablename__ = "notice_templates"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))
