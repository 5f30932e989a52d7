"""The catalog API: publish (201/422/409/404), list, read, diff, and its authorisation."""

from __future__ import annotations

import httpx

from keyshift.db.engine import Database
from tests.catalog.helpers import count_rows, example_files, example_text
from tests.support import mint_token

PUBLISH = "/v1/catalog/publish"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_publish_returns_201_with_each_ref_and_hash(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(PUBLISH, json={"files": example_files()}, headers=admin_headers)
    assert response.status_code == 201, response.text
    results = response.json()["results"]
    assert len(results) == 13
    assert all(r["created"] and len(r["content_hash"]) == 64 for r in results)
    assert {"ref": "pro-usage@2025", "kind": "plan"}.items() <= next(
        r for r in results if r["ref"] == "pro-usage@2025"
    ).items()

    again = await client.post(PUBLISH, json={"files": example_files()}, headers=admin_headers)
    assert again.status_code == 201
    assert not any(r["created"] for r in again.json()["results"])


async def test_list_read_and_diff(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    await client.post(PUBLISH, json={"files": example_files()}, headers=admin_headers)
    reader = bearer(await mint_token(db, "catalog:read"))

    listed = await client.get("/v1/catalog", headers=reader)
    assert listed.status_code == 200
    assert len(listed.json()) == 13
    assert {"kind", "ref", "content_hash", "published_at", "published_by"} <= listed.json()[
        0
    ].keys()
    plans = await client.get("/v1/catalog", params={"kind": "plan"}, headers=reader)
    assert {e["kind"] for e in plans.json()} == {"plan"} and len(plans.json()) == 7

    entry = await client.get("/v1/catalog/plan/pro-seat@2025", headers=reader)
    assert entry.status_code == 200
    body = entry.json()
    assert body["content"]["licensing"] == {
        "model": "seat",
        "max_activations": 5,
        "activation": "floating",
        "lease_ttl": "1h",
    }
    assert body["source_path"] == "plans/pro-seat-2025.toml"

    diff = await client.get(
        "/v1/catalog/diff", params={"from": "pro@2023", "to": "pro@2025"}, headers=reader
    )
    assert diff.status_code == 200
    features = diff.json()["features"]
    assert [f["name"] for f in features["lost"]] == ["legacy_csv_export"]
    assert "audit_log" in [f["name"] for f in features["gained"]]


async def test_invalid_manifests_give_422_naming_file_and_field_and_write_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    before = await count_rows(db)
    files = example_files()
    files["plans/pro-seat-2025.toml"] = files["plans/pro-seat-2025.toml"].replace(
        "max_activations = 5", "max_activations = 0"
    )
    files["editions/extra.toml"] = "[edition]\nkey = \n"
    response = await client.post(PUBLISH, json={"files": files}, headers=admin_headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_manifest"
    assert {
        "file": "plans/pro-seat-2025.toml",
        "field": "licensing.max_activations",
        "reason": "Input should be greater than or equal to 1",
        "line": 12,
    } in error["problems"]
    assert any(p["file"] == "editions/extra.toml" and p["line"] == 2 for p in error["problems"])
    assert await count_rows(db) == before


async def test_changed_content_under_a_published_version_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    await client.post(PUBLISH, json={"files": example_files("editions")}, headers=admin_headers)
    before = await count_rows(db)
    changed = example_text("editions/team-2025.toml").replace("seats = 50", "seats = 60")
    files = {
        "editions/new.toml": example_text("editions/team-2025.toml").replace('"2025"', '"2026"')
    }
    files["editions/team-2025.toml"] = changed
    response = await client.post(PUBLISH, json={"files": files}, headers=admin_headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "version_conflict"
    assert "team@2025" in response.json()["error"]["message"]
    assert await count_rows(db) == before


async def test_plan_with_unknown_edition_is_refused(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    before = await count_rows(db)
    files = {"plans/pro-seat-2025.toml": example_text("plans/pro-seat-2025.toml")}
    response = await client.post(PUBLISH, json={"files": files}, headers=admin_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "edition_not_found"
    assert response.json()["error"]["field"] == "plans/pro-seat-2025.toml: plan.edition"
    assert await count_rows(db) == before


async def test_without_a_token_is_401(client: httpx.AsyncClient, db: Database) -> None:
    before = await count_rows(db)
    response = await client.post(PUBLISH, json={"files": example_files()})
    assert response.status_code == 401
    assert (await client.get("/v1/catalog")).status_code == 401
    assert await count_rows(db) == before


async def test_a_token_without_the_scope_is_403(client: httpx.AsyncClient, db: Database) -> None:
    licenses_only = bearer(await mint_token(db, "licenses:read"))
    read_only = bearer(await mint_token(db, "catalog:read"))
    before = await count_rows(db)
    for headers in (licenses_only, read_only):
        response = await client.post(PUBLISH, json={"files": example_files()}, headers=headers)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
    assert (await client.get("/v1/catalog", headers=licenses_only)).status_code == 403
    assert await count_rows(db) == before


async def test_malformed_requests_are_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    before = await count_rows(db)
    unknown_field = await client.post(
        PUBLISH, json={"files": example_files(), "force": True}, headers=admin_headers
    )
    assert unknown_field.status_code == 422
    assert unknown_field.json()["error"]["code"] == "invalid_request"
    assert unknown_field.json()["error"]["field"] == "force"

    too_many = {f"e{i}.toml": "" for i in range(201)}
    assert (
        await client.post(PUBLISH, json={"files": too_many}, headers=admin_headers)
    ).status_code == 422
    assert (
        await client.post(PUBLISH, json={"files": {}}, headers=admin_headers)
    ).status_code == 422
    bad_name = {"../etc/\x00passwd": example_text("editions/pro-2025.toml")}
    assert (
        await client.post(PUBLISH, json={"files": bad_name}, headers=admin_headers)
    ).status_code == 422
    not_text = await client.post(PUBLISH, json={"files": {"a.toml": 5}}, headers=admin_headers)
    assert not_text.status_code == 422
    assert await count_rows(db) == before


async def test_a_body_over_the_limit_is_refused_before_parsing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    before = await count_rows(db)
    huge = {"big.toml": "# " + "x" * 100_000}
    response = await client.post(PUBLISH, json={"files": huge}, headers=admin_headers)
    assert response.status_code == 413
    assert await count_rows(db) == before


async def test_unknown_entries_are_404_and_bad_kinds_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    missing = await client.get("/v1/catalog/plan/nope@1", headers=admin_headers)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "plan_not_found"
    assert (await client.get("/v1/catalog/bundle/nope@1", headers=admin_headers)).status_code == 422
    assert (
        await client.get("/v1/catalog", params={"kind": "x"}, headers=admin_headers)
    ).status_code == 422
    diff = await client.get(
        "/v1/catalog/diff", params={"from": "a@1", "to": "b@1"}, headers=admin_headers
    )
    assert diff.status_code == 404
    assert (await client.get("/v1/catalog/diff", headers=admin_headers)).status_code == 422
