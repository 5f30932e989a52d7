"""The catalog over real HTTP: a `keyshift serve` process publishes and diffs."""

from __future__ import annotations

import httpx
import pytest

from keyshift.db.engine import Database
from tests.catalog.helpers import example_files
from tests.support import LiveServer, mint_token


@pytest.mark.server
async def test_publish_and_diff_through_a_live_server(
    live_server: LiveServer, db: Database
) -> None:
    headers = {"Authorization": f"Bearer {await mint_token(db, 'catalog:write', 'catalog:read')}"}
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as http:
        published = await http.post(
            "/v1/catalog/publish", json={"files": example_files()}, headers=headers
        )
        assert published.status_code == 201, published.text
        assert len(published.json()["results"]) == 13

        invalid = await http.post(
            "/v1/catalog/publish",
            json={"files": {"editions/x.toml": "[edition]\nkey = 'x'\nversion = '1'\n"}},
            headers=headers,
        )
        assert invalid.status_code == 422
        assert invalid.json()["error"]["problems"] == [
            {
                "file": "editions/x.toml",
                "field": "edition.name",
                "reason": "required field is missing",
                "line": 1,
            }
        ]

        diff = await http.get(
            "/v1/catalog/diff",
            params={"from": "pro-seat@2025", "to": "pro-usage@2025"},
            headers=headers,
        )
        assert diff.status_code == 200
        licensing = {c["field"]: (c["old"], c["new"]) for c in diff.json()["licensing"]}
        assert licensing["model"] == ("seat", "usage")
