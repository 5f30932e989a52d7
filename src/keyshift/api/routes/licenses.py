"""Licenses and activations.

Administrative routes take a bearer token (``licenses:read`` / ``licenses:write``). The client
routes (activate, heartbeat, deactivate) are authenticated by the license key itself and act
as ``license:<id>``. ``POST /v1/licenses/validate`` lives in ``routes/validation.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.api.deps import (
    ClientLimited,
    Session,
    State,
    limit_key,
    request_id_dependency,
    require,
)
from keyshift.api.routes.accounts import Grants
from keyshift.api.schemas import LicenseKey, Request, Timestamp
from keyshift.api.schemas import Response as ResponseModel
from keyshift.context import Actor
from keyshift.db.tables import License
from keyshift.errors import KeyshiftError, LicenseNotFound
from keyshift.licensing import activations, service
from keyshift.licensing.schemas import ActivationOut, LicenseDetail, LicenseIssued, LicenseOut
from keyshift.observability import metrics
from keyshift.security.keyring import Keyring

router = APIRouter(tags=["licenses"])
Reader = Annotated[Actor, Depends(require("licenses:read"))]
Writer = Annotated[Actor, Depends(require("licenses:write"))]

# A key is 29 characters grouped; allow spaces and sloppy typing, refuse anything longer.
Key = LicenseKey
Fingerprint = Annotated[str, Field(min_length=1, max_length=activations.MAX_FINGERPRINT)]
Reason = Annotated[str, Field(max_length=500)]


class LicenseIssue(Request):
    account_id: str = Field(min_length=1, max_length=36)
    expires_at: Timestamp | None = Field(
        default=None, description="Defaults to the plan's term from now."
    )
    max_activations: int | None = Field(default=None, ge=1, le=100_000)


class LicensePatch(Request):
    """Only the fields given change. ``max_activations_override``: null = the plan's cap.
    ``overrides``: replaces the hand-set features and extra quotas (null or {}: none)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    max_activations_override: int | None = Field(default=None, strict=True, ge=1, le=100_000)
    overrides: Grants | None = None


class StatusChange(Request):
    reason: Reason | None = None


class Renewal(Request):
    expires_at: Timestamp | None = Field(
        default=None, description="Renew to this date instead of adding the plan's term."
    )


class ClientActivate(Request):
    key: Key
    fingerprint: Fingerprint
    label: str | None = Field(default=None, max_length=activations.MAX_LABEL)


class ClientMachine(Request):
    key: Key
    fingerprint: Fingerprint


# -- administrative ----------------------------------------------------------------------------


@router.post("/v1/licenses", status_code=201)
async def issue_license(
    body: LicenseIssue, actor: Writer, session: Session, state: State
) -> LicenseIssued:
    """Issue a key. The response carries the plaintext key this once; afterwards only its hint."""
    issued = await service.issue_license(
        session,
        actor,
        state.secrets.keyring,
        account_id=body.account_id,
        expires_at=body.expires_at,
        max_activations_override=body.max_activations,
    )
    out = await _out(session, issued.license)
    return LicenseIssued(**out.model_dump(), key=issued.key)


async def _out(session: AsyncSession, row: License) -> LicenseOut:
    return LicenseOut.of(row, await service.license_standing(session, row))


async def _described(session: AsyncSession, row: License) -> LicenseDetail:
    """The license with its hand-set overrides (admin views; the client never sees these)."""
    out = await _out(session, row)
    return LicenseDetail(**out.model_dump(), overrides=row.overrides or {})


@router.get("/v1/licenses/{license_id}")
async def show_license(license_id: str, _actor: Reader, session: Session) -> LicenseDetail:
    return await _described(session, await service.get_license(session, license_id))


@router.patch("/v1/licenses/{license_id}")
async def patch_license(
    license_id: str, body: LicensePatch, actor: Writer, session: Session
) -> LicenseDetail:
    """Set what a migration carries per license: a cap over the plan's, hand-set features and
    extra quotas. Refused (409) while a migration holds the account."""
    changes: dict[str, Any] = {}
    if "max_activations_override" in body.model_fields_set:
        changes["max_activations_override"] = body.max_activations_override
    if "overrides" in body.model_fields_set:
        changes["overrides"] = body.overrides.model_dump() if body.overrides else None
    row = await service.set_license_overrides(session, actor, license_id, changes)
    return await _described(session, row)


@router.get("/v1/accounts/{account_id}/licenses")
async def list_account_licenses(
    account_id: str, _actor: Reader, session: Session
) -> list[LicenseOut]:
    return [await _out(session, row) for row in await service.list_licenses(session, account_id)]


@router.post("/v1/licenses/{license_id}/suspend")
async def suspend(
    license_id: str, actor: Writer, session: Session, body: StatusChange | None = None
) -> LicenseOut:
    reason = body.reason if body else None
    row = await service.suspend_license(session, actor, license_id, reason=reason)
    return await _out(session, row)


@router.post("/v1/licenses/{license_id}/reinstate")
async def reinstate(
    license_id: str, actor: Writer, session: Session, body: StatusChange | None = None
) -> LicenseOut:
    reason = body.reason if body else None
    row = await service.reinstate_license(session, actor, license_id, reason=reason)
    return await _out(session, row)


@router.post("/v1/licenses/{license_id}/revoke")
async def revoke(
    license_id: str, actor: Writer, session: Session, body: StatusChange | None = None
) -> LicenseOut:
    reason = body.reason if body else None
    row = await service.revoke_license(session, actor, license_id, reason=reason)
    return await _out(session, row)


@router.post("/v1/licenses/{license_id}/renew")
async def renew(
    license_id: str, actor: Writer, session: Session, body: Renewal | None = None
) -> LicenseOut:
    until: datetime | None = body.expires_at if body else None
    row = await service.renew_license(session, actor, license_id, until=until)
    return await _out(session, row)


class Revealed(ResponseModel):
    key: str = Field(description="The license's key, decrypted.")


@router.post("/v1/licenses/{license_id}/reveal")
async def reveal_license(
    license_id: str, actor: Writer, session: Session, state: State, response: Response
) -> Revealed:
    """The license's key, decrypted, for a customer who lost it (`keyshift licenses reveal`);
    the reveal is audited and the answer is not to be cached."""
    response.headers["Cache-Control"] = "no-store"
    return Revealed(key=await service.reveal(session, actor, state.secrets.keyring, license_id))


@router.get("/v1/licenses/{license_id}/activations")
async def list_activations(
    license_id: str, _actor: Reader, session: Session
) -> list[ActivationOut]:
    return [ActivationOut.of(a) for a in await activations.list_activations(session, license_id)]


@router.delete("/v1/activations/{activation_id}")
async def delete_activation(activation_id: str, actor: Writer, session: Session) -> ActivationOut:
    """Free a machine's seat (as the client's deactivate does, by the activation's id)."""
    return ActivationOut.of(await activations.deactivate_by_id(session, actor, activation_id))


# -- client (authenticated by the license key) ------------------------------------------------


async def _license_actor(
    session: AsyncSession, keyring: Keyring, key: str, http_request_id: str | None
) -> tuple[License, Actor]:
    row = await service.find_by_key(session, keyring, key)
    if row is None:
        raise LicenseNotFound("no license has this key", field="key")
    return row, Actor(id=f"license:{row.id}", request_id=http_request_id)


RequestId = Annotated[str | None, Depends(request_id_dependency)]


@router.post("/v1/licenses/activate", dependencies=ClientLimited)
async def client_activate(
    body: ClientActivate, session: Session, state: State, rid: RequestId, response: Response
) -> ActivationOut:
    """Bind this machine to the license: 201 for a new seat, 200 if it already held one."""
    limit_key(state, body.key)
    keyring = state.secrets.keyring
    row, actor = await _license_actor(session, keyring, body.key, rid)
    try:
        outcome = await activations.activate(
            session, actor, keyring, row, body.fingerprint, label=body.label
        )
    except KeyshiftError:
        metrics.record_activation("refused")
        raise
    metrics.record_activation("created" if outcome.created else "existing")
    response.status_code = 201 if outcome.created else 200
    return ActivationOut.of(outcome.activation)


@router.post("/v1/licenses/heartbeat", dependencies=ClientLimited)
async def client_heartbeat(
    body: ClientMachine, session: Session, state: State, rid: RequestId
) -> ActivationOut:
    limit_key(state, body.key)
    keyring = state.secrets.keyring
    row, actor = await _license_actor(session, keyring, body.key, rid)
    return ActivationOut.of(
        await activations.heartbeat(session, actor, keyring, row, body.fingerprint)
    )


@router.post("/v1/licenses/deactivate", dependencies=ClientLimited)
async def client_deactivate(
    body: ClientMachine, session: Session, state: State, rid: RequestId
) -> ActivationOut:
    limit_key(state, body.key)
    keyring = state.secrets.keyring
    row, actor = await _license_actor(session, keyring, body.key, rid)
    return ActivationOut.of(
        await activations.deactivate(session, actor, keyring, row, body.fingerprint)
    )
