"""The dashboard on both databases, through the app itself: sign-in and the session cookie,
scopes deciding which buttons exist AND which requests pass, CSRF (a forged, cross-site or
replayed form post is refused), clear errors for malformed forms, every refusal audited, and
the pages' numbers read from the database (a run's progress, an account's ledger)."""

from __future__ import annotations

import re
from contextlib import aclosing

import httpx
import pytest
from sqlalchemy import select, update

from keyshift.api import access
from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.licensing import keys
from keyshift.runs import service
from keyshift.runs.model import Cohort, RunOptions
from keyshift.security import tokens
from keyshift.security.secrets_store import Secrets
from tests.dashboard.helpers import browser, csrf_in, events, sign_in
from tests.migration import helpers as migration_helpers
from tests.runs.helpers import CREATOR, approved_run, cohort, drive, run_row
from tests.support import mint_token


@pytest.fixture
def transport(app_state: AppState) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(state=app_state))


async def _signed_in(
    transport: httpx.ASGITransport, db: Database, *scopes: str
) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=transport, base_url="http://keyshift.test")
    answer = await sign_in(client, await mint_token(db, *scopes, name="+".join(scopes)))
    assert answer.status_code == 303, answer.text
    return client


async def test_sign_in_exchanges_the_token_for_an_httponly_strict_session_cookie(
    transport: httpx.ASGITransport, db: Database
) -> None:
    token = await mint_token(db, "migrations:read")
    async with browser(transport) as client:
        answer = await sign_in(client, token)
        assert answer.status_code == 303 and answer.headers["location"] == "/dashboard"
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("keyshift_session=")
        )
        secret = cookie.split(";")[0].split("=", 1)[1]
        assert secret.startswith("kss_") and token not in cookie
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/dashboard"} <= flags
        runs = await client.get("/dashboard/runs")
        assert runs.status_code == 200 and token not in runs.text
        assert "default-src 'none'" in runs.headers["content-security-policy"]
        # The session's secret is no bearer token for the API.
        api = await client.get("/v1/runs", headers={"Authorization": f"Bearer {secret}"})
        assert api.status_code == 401
    [event] = await events(db, "dashboard.sign_in")
    assert event.details["scopes"] == ["migrations:read"]


async def test_a_visit_without_a_session_goes_to_the_sign_in_page(
    transport: httpx.ASGITransport,
) -> None:
    async with browser(transport) as client:
        answer = await client.get("/dashboard/runs")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/dashboard/sign-in"


async def test_a_refused_sign_in_says_why_sets_no_session_and_is_audited(
    transport: httpx.ASGITransport, db: Database
) -> None:
    async with browser(transport) as client:
        wrong = await sign_in(client, "kst_" + "x" * 43)
        assert wrong.status_code == 401
        assert "Sign-in refused" in wrong.text and "unknown bearer token" in wrong.text
        assert "keyshift_session" not in client.cookies
        # A sign-in form posted without the form's one-time value (another site's form).
        forged = await client.post(
            "/dashboard/sign-in", data={"token": await mint_token(db, "admin"), "csrf": "x"}
        )
        assert forged.status_code == 403 and "keyshift_session" not in client.cookies
        empty = await sign_in(client, "")
        assert empty.status_code == 422 and "token:" in empty.text
    refused = await events(db, "dashboard.refused")
    assert [(e.details["status"], e.details["code"]) for e in refused] == [
        (401, "unauthenticated"),
        (403, "csrf"),
        (422, "invalid_form"),
    ]
    assert all(e.actor == "dashboard:anonymous" for e in refused)


async def test_without_the_scope_the_button_is_absent_and_the_request_refused(
    transport: httpx.ASGITransport, db: Database, secrets: Secrets
) -> None:
    await cohort(db, secrets, 2)
    run = await approved_run(db)
    reader = await _signed_in(transport, db, "migrations:read")
    runner = await _signed_in(transport, db, "migrations:run")
    async with aclosing(reader), aclosing(runner):
        seen_by_reader = await reader.get(f"/dashboard/runs/{run.id}")
        seen_by_runner = await runner.get(f"/dashboard/runs/{run.id}")
        assert seen_by_reader.status_code == seen_by_runner.status_code == 200
        assert 'id="action-start"' in seen_by_runner.text
        assert 'id="action-start"' not in seen_by_reader.text
        assert "No action is open to this session" in seen_by_reader.text
        confirm = await reader.get(f"/dashboard/runs/{run.id}/start")
        assert confirm.status_code == 403 and "migrations:run" in confirm.text
        csrf = csrf_in(seen_by_reader.text)  # the reader's own, valid CSRF token
        posted = await reader.post(
            f"/dashboard/runs/{run.id}/start", data={"csrf": csrf, "confirm": "yes"}
        )
        assert (
            posted.status_code == 403 and "lacks the &#39;migrations:run&#39; scope" in posted.text
        )
    assert (await run_row(db, run.id)).state == "approved"
    refused = await events(db, "dashboard.refused")
    assert [(e.details["method"], e.details["code"]) for e in refused] == [
        ("GET", "forbidden"),
        ("POST", "forbidden"),
    ]
    assert all(e.actor.startswith("token:") for e in refused)


async def test_forged_cross_site_and_replayed_posts_are_refused_and_audited(
    transport: httpx.ASGITransport, db: Database, secrets: Secrets
) -> None:
    await cohort(db, secrets, 2)
    run = await approved_run(db)
    alice = await _signed_in(transport, db, "migrations:run")
    mallory = await _signed_in(transport, db, "migrations:run")
    async with aclosing(alice), aclosing(mallory):
        url = f"/dashboard/runs/{run.id}/start"
        mine = csrf_in((await alice.get(url)).text)
        theirs = csrf_in((await mallory.get(url)).text)
        assert mine != theirs  # per session
        for form, headers in [
            ({"confirm": "yes"}, {}),  # no token
            ({"csrf": theirs, "confirm": "yes"}, {}),  # another session's token
            ({"csrf": "0" * 64, "confirm": "yes"}, {}),  # a made-up one
            ({"csrf": mine, "confirm": "yes"}, {"Origin": "https://evil.example"}),
        ]:
            answer = await alice.post(url, data=form, headers=headers)
            assert answer.status_code == 403, (form, headers, answer.text)
        assert (await run_row(db, run.id)).state == "approved"
        # Signing out ends the session: the same post, replayed with its cookie, is refused.
        cookie = alice.cookies["keyshift_session"]
        out = await alice.post("/dashboard/sign-out", data={"csrf": mine})
        assert out.status_code == 303
        assert "keyshift_session" not in alice.cookies
        alice.cookies.set("keyshift_session", cookie)  # the captured cookie, replayed
        replayed = await alice.post(url, data={"csrf": mine, "confirm": "yes"})
        assert replayed.status_code == 401 and "revoked" in replayed.text
    assert (await run_row(db, run.id)).state == "approved"
    codes = [
        (e.details["status"], e.details["code"]) for e in await events(db, "dashboard.refused")
    ]
    assert codes == [(403, "csrf")] * 4 + [(401, "unauthenticated")]
    assert len(await events(db, "dashboard.sign_out")) == 1


async def test_malformed_forms_get_a_clear_error_naming_the_field(
    transport: httpx.ASGITransport, db: Database, secrets: Secrets
) -> None:
    await cohort(db, secrets, 1)
    run = await approved_run(db)
    client = await _signed_in(transport, db, "migrations:run")
    async with aclosing(client):
        url = f"/dashboard/runs/{run.id}/start"
        csrf = csrf_in((await client.get(url)).text)
        cases = {
            "confirm": {"csrf": csrf},
            "extra": {"csrf": csrf, "confirm": "yes", "extra": "1"},
        }
        for field, form in cases.items():
            answer = await client.post(url, data=form)
            assert answer.status_code == 422, answer.text
            assert f"<code>{field}</code>" in answer.text
        twice = await client.post(
            url,
            content=f"csrf={csrf}&confirm=yes&confirm=yes",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert twice.status_code == 422 and "more than once" in twice.text
        nul = await client.post(url, data={"csrf": csrf, "confirm": "yes\x00"})
        assert nul.status_code == 422 and "NUL" in nul.text
        as_json = await client.post(url, json={"csrf": csrf, "confirm": "yes"})
        assert as_json.status_code == 415
        assert as_json.json()["error"]["field"] == "content-type"
        unknown_run = await client.get("/dashboard/runs/nope/start")
        assert unknown_run.status_code == 404 and "no run nope" in unknown_run.text
    assert (await run_row(db, run.id)).state == "approved"


async def test_each_action_moves_the_run_and_is_audited_under_the_signed_in_token(
    transport: httpx.ASGITransport, db: Database, secrets: Secrets, app_state: AppState
) -> None:
    await cohort(db, secrets, 2)
    run = await service.create(db, CREATOR, migration_helpers.rules(), Cohort(), RunOptions())
    await service.report(db, CREATOR, run.id)
    client = await _signed_in(transport, db, "migrations:run", "migrations:approve")
    async with aclosing(client):

        async def act(action: str, expected: str) -> None:
            confirm = await client.get(f"/dashboard/runs/{run.id}/{action}")
            assert confirm.status_code == 200, confirm.text
            done = await client.post(
                f"/dashboard/runs/{run.id}/{action}",
                data={"csrf": csrf_in(confirm.text), "confirm": "yes"},
            )
            assert done.status_code == 303, done.text
            assert (await run_row(db, run.id)).state == expected
            page = await client.get(done.headers["location"])
            assert 'role="status"' in page.text

        await act("approve", "approved")
        await act("start", "running")
        await act("pause", "paused")
        await act("resume", "running")
        await act("abort", "aborted")
        await act("rollback", "rolling_back")
        # Not possible now: refused with the state machine's own words, and audited.
        page = await client.get(f"/dashboard/runs/{run.id}")
        late = await client.post(
            f"/dashboard/runs/{run.id}/pause", data={"csrf": csrf_in(page.text), "confirm": "yes"}
        )
        assert late.status_code == 409 and "pause needs it to be running" in late.text
    moves = [e.action for e in await events(db, "run.start")]
    assert moves == ["run.start"]
    for action in ("approve", "start", "pause", "resume", "abort", "rollback"):
        [event] = await events(db, f"run.{action}")
        assert event.actor.startswith("token:")
    [refused] = await events(db, "dashboard.refused")
    assert refused.details["code"] == "wrong_run_state"


async def test_the_run_page_and_account_drill_down_show_what_the_database_holds(
    transport: httpx.ASGITransport, db: Database, secrets: Secrets, app_state: AppState
) -> None:
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=2, canary=1))
    await service.start(db, CREATOR, run.id)
    await drive(app_state.executor, run.id)
    client = await _signed_in(transport, db, "migrations:read")
    async with aclosing(client):
        page = await client.get(f"/dashboard/runs/{run.id}")
        assert "3 of 3 (100 %)" in page.text
        assert "passed (1 accounts; migrated: 1)" in page.text
        account = await client.get(f"/dashboard/runs/{run.id}/accounts/{ids[1]}")
        assert account.status_code == 200
        async with db.transaction() as session:
            migration = (
                await session.execute(select(Migration).where(Migration.account_id == ids[1]))
            ).scalar_one()
        assert f'<code id="snapshot-hash">{migration.snapshot_hash}</code>' in account.text
        for step in ("lock", "snapshot", "prepare", "cutover", "verify", "receipt"):
            assert f'<th scope="row">{step}</th>' in account.text
        assert migration.receipt is not None
        assert migration.receipt["signature"] in account.text
        assert "verifies (Ed25519, key" in account.text
        # A receipt altered in the database no longer verifies, and the page says so.
        forged = {**migration.receipt, "body": {**migration.receipt["body"], "to": "old-seat@1"}}
        async with db.transaction() as session:
            await session.execute(
                update(Migration).where(Migration.id == migration.id).values(receipt=forged)
            )
        altered = await client.get(f"/dashboard/runs/{run.id}/accounts/{ids[1]}")
        assert "does NOT verify: signature does not verify" in altered.text
        events_answer = await client.get(f"/dashboard/runs/{run.id}/events")
        assert events_answer.headers["content-type"].startswith("text/event-stream")
        assert "event: progress" in events_answer.text and "event: end" in events_answer.text
        assert "3 of 3" in events_answer.text
        elsewhere = await client.get(f"/dashboard/runs/{run.id}/accounts/{'0' * 36}")
        assert elsewhere.status_code == 404


async def test_revoking_the_token_ends_the_sessions_it_opened(
    transport: httpx.ASGITransport, db: Database
) -> None:
    token = await mint_token(db, "migrations:read")
    async with browser(transport) as client:
        assert (await sign_in(client, token)).status_code == 303
        assert (await client.get("/dashboard/runs")).status_code == 200
        async with db.transaction() as session:
            owner = await tokens.authenticate(session, token)
            await tokens.revoke_token(session, SYSTEM, owner.id.removeprefix("token:"))
        ended = await client.get("/dashboard/runs")
        assert ended.status_code == 401 and "revoked" in ended.text
        assert "keyshift_session" not in client.cookies  # cleared
    [refused] = await events(db, "dashboard.refused")
    assert refused.details["code"] == "unauthenticated"


def _not_found(page: httpx.Response) -> int:
    """The licensing page's count of NOT_FOUND validations (0 when it lists none)."""
    found = re.search(r"<code>NOT_FOUND</code></th><td>(\d+)</td>", page.text)
    return int(found.group(1)) if found else 0


async def test_the_licensing_overview_follows_the_scopes(
    transport: httpx.ASGITransport, db: Database
) -> None:
    licensing = await _signed_in(transport, db, "licenses:read")
    auditor = await _signed_in(transport, db, "licenses:read", "audit:read")
    runs_only = await _signed_in(transport, db, "migrations:read")
    async with aclosing(licensing), aclosing(auditor), aclosing(runs_only):
        before = _not_found(await licensing.get("/dashboard/licensing"))
        unissued = keys.generate()
        for _ in range(3):
            answer = await licensing.post("/v1/licenses/validate", json={"key": unissued})
            assert answer.json()["code"] == "NOT_FOUND"
        page = await licensing.get("/dashboard/licensing")
        assert page.status_code == 200
        assert _not_found(page) == before + 3
        assert "needs the <code>audit:read</code> scope" in page.text
        assert 'href="/dashboard/runs"' not in page.text  # no link to what it may not see
        full = await auditor.get("/dashboard/licensing")
        assert "No anomaly recorded." in full.text
        refused = await runs_only.get("/dashboard/licensing")
        assert refused.status_code == 403
        home = await licensing.get("/dashboard")
        assert home.headers["location"] == "/dashboard/licensing"


def test_every_dashboard_route_but_the_sign_in_form_and_static_files_needs_a_session(
    app_state: AppState,
) -> None:
    table = access.route_table(create_app(state=app_state).routes)
    dashboard = [r for r in table if r.path.startswith("/dashboard")]
    open_ones = {(r.method, r.path) for r in dashboard if r.credential != "session"}
    assert open_ones == {
        ("GET", "/dashboard/sign-in"),
        ("POST", "/dashboard/sign-in"),
        ("GET", "/dashboard/static/dashboard.css"),
        ("GET", "/dashboard/static/dashboard.js"),
    }
    by_path = {(r.method, r.path): r.scopes for r in dashboard}
    assert by_path[("POST", "/dashboard/runs/{run_id}/approve")] == ("migrations:approve",)
    for move in ("start", "pause", "resume", "abort", "rollback"):
        assert by_path[("POST", f"/dashboard/runs/{{run_id}}/{move}")] == ("migrations:run",)
