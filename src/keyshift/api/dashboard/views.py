"""What each dashboard page shows, read in one transaction per page: a run with its
progress, canary, failures, held and quarantined accounts; one account's ledger; the
licensing overview (from the metrics this process serves at ``/metrics`` and, for a session
that may read the audit log, the anomalies it recorded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.canonical import canonical_json
from keyshift.client.errors import LicenseFileError
from keyshift.client.signatures import b64decode_strict, verify_signature
from keyshift.db.tables import (
    AuditEvent,
    Migration,
    MigrationRun,
    MigrationStep,
    RunAccount,
    UsageEvent,
)
from keyshift.observability import metrics
from keyshift.runs import service
from keyshift.runs.errors import RunNotFound
from keyshift.runs.model import AccountState, RunOptions, RunState

#: The most accounts a run page lists in each of its lists.
LISTED = 50


@dataclass(frozen=True)
class Canary:
    size: int
    by_state: dict[str, int]
    status: str  # "none", "in progress", "passed", "halted"


@dataclass(frozen=True)
class RunPage:
    run: MigrationRun
    progress: service.Progress
    canary: Canary
    failures: list[RunAccount]
    held: list[RunAccount]
    quarantined: list[RunAccount]
    accounts: list[RunAccount]

    @property
    def percent(self) -> int:
        total = self.progress.total
        return int(100 * self.progress.done / total) if total else 100


def _canary(run: MigrationRun, progress: service.Progress) -> Canary:
    options = RunOptions.model_validate(run.options)
    size = options.canary_size(run.total)
    if not size:
        return Canary(0, {}, "none")
    wave = progress.waves.get(0, {})
    waiting = wave.get(AccountState.PENDING, 0) + wave.get(AccountState.CLAIMED, 0)
    if run.halted_reason and waiting:
        status = "halted"
    elif waiting:
        status = "in progress" if run.state != RunState.APPROVED else "not started"
    else:
        status = (
            "passed" if wave.get(AccountState.QUARANTINED, 0) == 0 else "finished, with failures"
        )
    return Canary(size, wave, status)


async def _accounts_where(session: AsyncSession, run_id: str, *where: Any) -> list[RunAccount]:
    query = (
        select(RunAccount)
        .where(RunAccount.run_id == run_id, *where)
        .order_by(RunAccount.position)
        .limit(LISTED)
    )
    return list((await session.execute(query)).scalars())


async def run_page(session: AsyncSession, run_id: str, now: datetime) -> RunPage:
    run = await service.get(session, run_id)
    progress = await service.progress(session, run, now)
    return RunPage(
        run=run,
        progress=progress,
        canary=_canary(run, progress),
        failures=await _accounts_where(session, run_id, RunAccount.error.is_not(None)),
        held=await _accounts_where(session, run_id, RunAccount.state == AccountState.HELD),
        quarantined=await _accounts_where(
            session, run_id, RunAccount.state == AccountState.QUARANTINED
        ),
        accounts=await _accounts_where(session, run_id),
    )


async def live_progress(session: AsyncSession, run_id: str, now: datetime) -> RunPage:
    """The part of the run page that server-sent events refresh (no account lists)."""
    run = await service.get(session, run_id)
    progress = await service.progress(session, run, now)
    failures = await _accounts_where(session, run_id, RunAccount.error.is_not(None))
    return RunPage(run, progress, _canary(run, progress), failures, [], [], [])


def receipt_check(receipt: dict[str, Any], public_keys: dict[str, bytes]) -> str:
    """Whether a receipt's Ed25519 signature verifies against this server's signing keys, as
    a customer holding the published keys would check it (``keyshift.client``)."""
    try:
        signature = b64decode_strict(str(receipt["signature"]))
        keyid, algorithm = str(receipt["keyid"]), str(receipt["algorithm"])
        verify_signature(canonical_json(receipt["body"]), keyid, algorithm, signature, public_keys)
    except (KeyError, TypeError, LicenseFileError) as problem:
        return f"does NOT verify: {problem}"
    return f"verifies (Ed25519, key {keyid})"


@dataclass(frozen=True)
class AccountPage:
    run: MigrationRun
    entry: RunAccount
    migration: Migration | None
    steps: list[MigrationStep]
    receipt_verdict: str | None = None

    @property
    def receipt(self) -> str | None:
        if self.migration is None or self.migration.receipt is None:
            return None
        return json.dumps(self.migration.receipt, indent=2, sort_keys=True)

    @staticmethod
    def details(step: MigrationStep) -> str:
        return json.dumps(step.details, sort_keys=True) if step.details else ""


class AccountNotInRun(RunNotFound):
    code = "account_not_in_run"


async def account_page(
    session: AsyncSession, run_id: str, account_id: str, public_keys: dict[str, bytes]
) -> AccountPage:
    run = await service.get(session, run_id)
    entry = await session.get(RunAccount, (run_id, account_id))
    if entry is None:
        raise AccountNotInRun(f"run {run_id} has no account {account_id}", field="account_id")
    migration = None
    steps: list[MigrationStep] = []
    if entry.migration_id is not None:
        migration = await session.get(Migration, entry.migration_id)
        steps = list(
            (
                await session.execute(
                    select(MigrationStep)
                    .where(MigrationStep.migration_id == entry.migration_id)
                    .order_by(MigrationStep.seq)
                )
            ).scalars()
        )
    verdict = None
    if migration is not None and migration.receipt is not None:
        verdict = receipt_check(migration.receipt, public_keys)
    return AccountPage(run, entry, migration, steps, verdict)


@dataclass
class Licensing:
    validations: dict[str, float] = field(default_factory=dict)
    usage_events: dict[str, float] = field(default_factory=dict)
    usage_requests: float = 0
    usage_mean_ms: float | None = None
    usage_stored_24h: int = 0
    activations: dict[str, float] = field(default_factory=dict)
    anomalies: dict[str, float] = field(default_factory=dict)
    recent_anomalies: list[AuditEvent] | None = None  # None: the session may not read them


def _by_label(families: dict[str, Any], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    family = families.get(name)
    for sample in family.samples if family else ():
        if sample.name == f"{name}_total":
            key = sample.labels.get(label, "")
            out[key] = out.get(key, 0) + sample.value
    return dict(sorted(out.items()))


async def licensing(session: AsyncSession, now: datetime, *, with_anomalies: bool) -> Licensing:
    text, _ = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    out = Licensing(
        validations=_by_label(families, "keyshift_validations", "code"),
        usage_events=_by_label(families, "keyshift_usage_events", "result"),
        activations=_by_label(families, "keyshift_activations", "result"),
        anomalies=_by_label(families, "keyshift_anomalies", "kind"),
    )
    ingest = families.get("keyshift_usage_ingest_duration_seconds")
    if ingest is not None:
        count = sum(s.value for s in ingest.samples if s.name.endswith("_count"))
        total = sum(s.value for s in ingest.samples if s.name.endswith("_sum"))
        out.usage_requests = count
        out.usage_mean_ms = 1000 * total / count if count else None
    out.usage_stored_24h = int(
        (
            await session.execute(
                select(func.count()).where(UsageEvent.received_at > now - timedelta(hours=24))
            )
        ).scalar_one()
    )
    if with_anomalies:
        out.recent_anomalies = list(
            (
                await session.execute(
                    select(AuditEvent)
                    .where(AuditEvent.action.like("anomaly.%"))
                    .order_by(AuditEvent.seq.desc())
                    .limit(LISTED)
                )
            ).scalars()
        )
    return out
