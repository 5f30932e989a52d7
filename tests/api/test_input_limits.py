"""The input rules every route shares (docs/security.md, "Input limits"), one class at a time
on both databases: NUL and lone surrogates in any text, integers beyond 64 bits, unknown query
parameters, and dates and durations outside the accepted range. Each is a 422 naming the
field, and nothing stored can make a later read fail."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from keyshift import dates
from keyshift.catalog.durations import Duration
from keyshift.db.engine import Database
from keyshift.db.tables import License
from keyshift.security.secrets_store import Secrets
from tests import factories


def _refused(response: httpx.Response, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["field"] == field, error
    return error


@pytest.fixture
async def seat(db: Database, secrets: Secrets) -> tuple[str, str, str]:
    """(account id, license id, key) of a seat-plan license (expiry plus a 7-day grace)."""
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.SEAT_NODE)
    row, key = await factories.issue_license(db, secrets, account.id)
    return account.id, row.id, key


# -- NUL ---------------------------------------------------------------------------------------


async def test_nul_in_a_body_field_is_422_naming_it(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post("/v1/accounts", json={"name": "a\x00b"}, headers=admin_headers)
    assert "NUL" in _refused(response, "name")["message"]
    nested = await client.post(
        "/v1/accounts",
        json={"name": "n", "attributes": {"hold": ["ok", "x\x00"]}},
        headers=admin_headers,
    )
    _refused(nested, "attributes.hold.1")
    assert (await client.get("/v1/accounts", headers=admin_headers)).json()["items"] == []


async def test_nul_in_a_path_id_or_a_query_parameter_is_422_naming_it(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    _refused(await client.get("/v1/accounts/a%00b", headers=admin_headers), "path.account_id")
    _refused(await client.get("/v1/accounts?after=%00", headers=admin_headers), "query.after")
    _refused(
        await client.get("/v1/audit/events?account_id=x%00", headers=admin_headers),
        "query.account_id",
    )


async def test_nul_on_the_validation_fast_path_is_422(
    client: httpx.AsyncClient, seat: tuple[str, str, str]
) -> None:
    _, _, key = seat
    response = await client.post("/v1/licenses/validate", json={"key": key, "fingerprint": "m\x00"})
    _refused(response, "fingerprint")


# -- lone surrogates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"name": "n", "attributes": {"tier": "\\ud800"}}',  # escaped
        b'{"name": "n", "attributes": {"tier": "\xed\xa0\x80"}}',  # raw surrogate bytes
    ],
    ids=["escaped", "raw"],
)
async def test_a_lone_surrogate_is_422_naming_the_field(
    client: httpx.AsyncClient, admin_headers: dict[str, str], content: bytes
) -> None:
    response = await client.post(
        "/v1/accounts",
        content=content,
        headers={**admin_headers, "content-type": "application/json"},
    )
    assert "surrogate" in _refused(response, "attributes.tier")["message"]


async def test_a_lone_surrogate_as_a_member_name_is_422_at_its_object(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.put(
        "/v1/accounts/any/preferences",
        content=b'{"ok": {"\\udfff": 1}}',
        headers={**admin_headers, "content-type": "application/json"},
    )
    _refused(response, "ok")


# -- integers beyond 64 bits -------------------------------------------------------------------


async def test_integers_beyond_64_bits_in_free_form_json_are_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str], seat: tuple[str, str, str]
) -> None:
    account_id, _, _ = seat
    for value in (2**63, -(2**63) - 1, 10**30):
        attributes = await client.post(
            "/v1/accounts", json={"name": "n", "attributes": {"n": value}}, headers=admin_headers
        )
        _refused(attributes, "attributes.n")
        preferences = await client.put(
            f"/v1/accounts/{account_id}/preferences",
            json={"limits": {"max": value}},
            headers=admin_headers,
        )
        _refused(preferences, "limits.max")
    fits = await client.put(
        f"/v1/accounts/{account_id}/preferences",
        json={"limits": {"max": 2**63 - 1, "min": -(2**63)}},
        headers=admin_headers,
    )
    assert fits.status_code == 200, fits.text


async def test_an_integer_query_parameter_beyond_64_bits_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    _refused(
        await client.get(f"/v1/audit/events?after_seq={2**63}", headers=admin_headers),
        "query.after_seq",
    )
    _refused(
        await client.get(f"/v1/audit/events?after_seq={10**30}", headers=admin_headers),
        "query.after_seq",
    )
    fits = await client.get(f"/v1/audit/events?after_seq={2**63 - 1}", headers=admin_headers)
    assert fits.status_code == 200 and fits.json() == []


# -- unknown query parameters ------------------------------------------------------------------


async def test_an_unknown_query_parameter_is_422_naming_it(
    client: httpx.AsyncClient, admin_headers: dict[str, str], seat: tuple[str, str, str]
) -> None:
    error = _refused(await client.get("/v1/accounts?plan=pro", headers=admin_headers), "query.plan")
    assert "unknown" in error["message"]
    _refused(await client.get("/v1/accounts?limit=5&Limit=5", headers=admin_headers), "query.Limit")
    aliased = await client.get(
        "/v1/catalog/diff?from=usage@1&to=seat-node@1", headers=admin_headers
    )
    assert aliased.status_code == 200, aliased.text  # declared under their aliases
    _, _, key = seat
    fast = await client.post("/v1/licenses/validate?debug=1", json={"key": key})
    _refused(fast, "query.debug")


# -- dates and durations -----------------------------------------------------------------------


async def test_renewing_past_the_date_range_is_422_and_the_key_keeps_validating(
    client: httpx.AsyncClient, admin_headers: dict[str, str], seat: tuple[str, str, str]
) -> None:
    _, license_id, key = seat
    for until in ("9999-12-31T00:00:00Z", "9001-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"):
        response = await client.post(
            f"/v1/licenses/{license_id}/renew", json={"expires_at": until}, headers=admin_headers
        )
        _refused(response, "expires_at")
    latest = await client.post(
        f"/v1/licenses/{license_id}/renew",
        json={"expires_at": "9000-12-31T23:59:59Z"},
        headers=admin_headers,
    )
    assert latest.status_code == 200, latest.text
    validated = await client.post("/v1/licenses/validate", json={"key": key})
    assert validated.status_code == 200 and validated.json()["code"] == "VALID"
    checked_out = await client.post("/v1/licenses/checkout", json={"key": key})
    assert checked_out.status_code == 200, checked_out.text


async def test_an_expiry_at_the_calendars_edge_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str], seat: tuple[str, str, str]
) -> None:
    account_id, _, _ = seat
    for expires_at in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00"):
        response = await client.post(
            "/v1/licenses",
            json={"account_id": account_id, "expires_at": expires_at},
            headers=admin_headers,
        )
        _refused(response, "expires_at")


async def test_a_stored_expiry_at_the_calendars_end_still_validates(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    db: Database,
    seat: tuple[str, str, str],
) -> None:
    """A row written before dates were bounded: its expiry plus the grace is past year 9999,
    and reads still answer."""
    _, license_id, key = seat
    async with db.transaction() as session:
        far = datetime(9999, 12, 31, tzinfo=UTC)
        await session.execute(
            update(License).where(License.id == license_id).values(expires_at=far)
        )
    validated = await client.post("/v1/licenses/validate", json={"key": key})
    assert validated.status_code == 200 and validated.json()["code"] == "VALID"
    checked_out = await client.post("/v1/licenses/checkout", json={"key": key})
    assert checked_out.status_code == 200, checked_out.text
    renewed = await client.post(f"/v1/licenses/{license_id}/renew", headers=admin_headers)
    _refused(renewed, "expires_at")  # by the plan's term: past the range, said so


@pytest.mark.parametrize("ttl", ["9999y", "120000mo", "999999w", "999999d", "101y"])
async def test_a_license_file_ttl_past_the_longest_duration_is_422(
    client: httpx.AsyncClient, seat: tuple[str, str, str], ttl: str
) -> None:
    _, _, key = seat
    response = await client.post("/v1/licenses/checkout", json={"key": key, "ttl": ttl})
    _refused(response, "ttl")


async def test_usage_timestamps_and_periods_outside_the_range_are_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.USAGE)
    _, key = await factories.issue_license(db, secrets, account.id)
    for timestamp in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59Z"):
        event = {"meter": "api_calls", "quantity": 1, "idempotency_key": timestamp}
        single = await client.post("/v1/usage", json={"key": key, **event, "timestamp": timestamp})
        _refused(single, "timestamp")
        batch = await client.post(
            "/v1/usage/batch", json={"key": key, "events": [{**event, "timestamp": timestamp}]}
        )
        _refused(batch, "events.0.timestamp")
    for period in ("0001-01-01", "9999-12-31", "1969-12-31"):
        response = await client.get(
            f"/v1/accounts/{account.id}/usage?period={period}", headers=admin_headers
        )
        _refused(response, "period")
    edge = await client.get(
        f"/v1/accounts/{account.id}/usage?period=9000-12-31", headers=admin_headers
    )
    assert edge.status_code == 200, edge.text


def test_the_latest_date_plus_the_longest_duration_is_still_a_date() -> None:
    for longest in ("100y", "1200mo", f"{100 * 366}d", f"{100 * 366 * 24}h"):
        assert Duration.parse(longest).after(dates.LATEST).year < 9999
    for too_long in ("101y", "1201mo", f"{100 * 366 + 1}d"):
        with pytest.raises(ValueError, match="longest duration"):
            Duration.parse(too_long)
