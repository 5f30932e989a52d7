"""The dashboard end to end in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), against a real `keyshift serve` and a real `keyshift worker` on PostgreSQL: sign
in with the keyboard, start a run, watch it progress live (server-sent events, no reload),
pause and resume it, drill down to an account's ledger, snapshot hash and receipt. A
screenshot of the run page is saved during the live run.

Chromium comes from Debian and Playwright from the test extra (``.ci/run`` installs both;
``playwright install`` is never run). Under CI a missing browser fails these tests; elsewhere
they are skipped."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from tests.runs.helpers import approved_run, cohort, run_row
from tests.support import IN_CI, cli_env, mint_token, serving

pytestmark = pytest.mark.server

CHROMIUM = "/usr/bin/chromium"
#: Accounts paced at RATE per second: the run lasts about ACCOUNTS / RATE seconds.
ACCOUNTS = 24
RATE = 3.0


def _browser_or_skip() -> Any:
    problem = None
    if not Path(CHROMIUM).exists():
        problem = f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        problem = "playwright is missing: pip install -e '.[test]'"
        async_playwright = None
    if problem is not None:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    return async_playwright


@pytest.fixture
async def page(db: Database) -> AsyncIterator[Any]:
    """A page of a fresh headless Chromium (PostgreSQL only: the test runs a separate worker
    process beside the server, which SQLite's single writer does not serve)."""
    if db.dialect != "postgresql":
        pytest.skip("a separate worker process shares PostgreSQL with the server")
    async_playwright = _browser_or_skip()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 1600})
            yield await context.new_page()
        finally:
            await browser.close()


#: What a page must have for a keyboard and screen-reader user, checked in the browser: every
#: field labelled, every link and button named, every table captioned, states written out.
_ACCESSIBILITY = """() => {
  const problems = [];
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea, progress')) {
    if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) {
      problems.push('unlabelled: ' + el.outerHTML.slice(0, 80));
    }
  }
  for (const el of document.querySelectorAll('a, button')) {
    if (!el.textContent.trim() && !el.getAttribute('aria-label')) {
      problems.push('nameless: ' + el.outerHTML.slice(0, 80));
    }
  }
  for (const table of document.querySelectorAll('table')) {
    if (!table.querySelector('caption')) problems.push('table without a caption');
  }
  for (const state of document.querySelectorAll('.state')) {
    if (!state.textContent.trim()) problems.push('a state shown by colour only');
  }
  if (!document.documentElement.lang) problems.push('no lang');
  if (document.querySelectorAll('h1').length !== 1) problems.push('not exactly one h1');
  if (!document.querySelector('main')) problems.push('no main landmark');
  return problems;
}"""


async def _accessible(page: Any) -> None:
    assert await page.evaluate(_ACCESSIBILITY) == [], page.url


async def _tab_to(page: Any, name: str, limit: int = 40) -> None:
    """Press Tab from the top of the page until ``name`` has the focus."""
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(limit):
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.textContent.trim()")
        if focused == name:
            return
    raise AssertionError(f"{name!r} is not reachable with Tab on {page.url}")


def _done(text: str) -> int:
    found = re.match(r"(\d+) of (\d+)", text.strip())
    assert found is not None, text
    return int(found.group(1))


async def test_sign_in_start_watch_pause_resume_and_drill_down_in_chromium(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path, page: Any
) -> None:
    await cohort(db, secrets, ACCOUNTS)
    run = await approved_run(db, options=RunOptions(batch_size=2, rate=RATE))
    token = await mint_token(db, "migrations:run", name="operator")
    env = cli_env(settings)
    with serving(env, tmp_path / "serve.log") as server:
        worker = _start_worker(env, run.id, tmp_path / "worker.log")
        try:
            await _drive(page, server.base_url, token, run.id, db, tmp_path)
        finally:
            _stop(worker)


def _start_worker(env: dict[str, str], run_id: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "keyshift.cli", "worker", "--run", run_id, "--poll", "0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=5)


async def _drive(page: Any, base: str, token: str, run_id: str, db: Database, tmp: Path) -> None:
    from playwright.async_api import expect

    # Sign in with the keyboard only: the field is found by its label.
    await page.goto(f"{base}/dashboard")
    assert page.url.endswith("/dashboard/sign-in")
    await _accessible(page)
    await page.get_by_label("API token").focus()
    await page.keyboard.type(token)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Migration runs")).to_be_visible()
    await _accessible(page)
    assert token not in await page.content()  # the bearer token is not in the page …
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["keyshift_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["value"] != token and not session["value"].startswith("kst_")  # … nor kept
    assert token not in page.url

    # The run page, then start it through its confirmation page.
    await page.get_by_role("link", name=re.compile("old-to-new")).click()
    await expect(page.locator("#run-state")).to_have_text("approved")
    await _accessible(page)
    await page.get_by_role("link", name="Start…").click()
    await _accessible(page)
    await page.get_by_role("button", name="Yes, start the run").click()
    await expect(page.get_by_role("status").filter(has_text="Run started.")).to_be_visible()

    # Live progress: the numbers move without a reload (a marker set on this document stays).
    await page.evaluate("window.__sameDocument = true")
    progress = page.locator("#progress-text")
    await expect(progress).not_to_have_text(re.compile(r"^0 of"), timeout=15_000)
    first = _done(await progress.inner_text())
    assert 0 < first < ACCOUNTS, "the run should still be moving"
    await expect(page.locator("#rate")).to_have_text(re.compile(r"accounts/s"), timeout=10_000)
    shot = tmp / "run-page-live.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    await expect(progress).not_to_have_text(re.compile(rf"^{first} of"), timeout=10_000)
    assert await page.evaluate("window.__sameDocument === true")

    # Pause with the keyboard alone; the run stops taking accounts.
    await _accessible(page)
    await _tab_to(page, "Pause…")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("button", name="Yes, pause the run")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("status").filter(has_text="Run paused.")).to_be_visible()
    await expect(page.locator("#run-state")).to_have_text("paused")
    assert (await run_row(db, run_id)).state == "paused"
    await expect(page.get_by_role("link", name="Pause…")).to_have_count(0)
    settled = _done(await progress.inner_text())
    counts = []
    for _ in range(2):  # unpaused, the paced worker would settle about four more each time
        await asyncio.sleep(1.5)
        await page.reload()
        counts.append(_done(await page.locator("#progress-text").inner_text()))
    # The batch in hand (at most batch_size accounts) finishes; then nothing moves.
    assert counts[0] == counts[1] <= settled + 2
    assert counts[1] < ACCOUNTS

    # Resume; it runs to the end, which the live region announces.
    await page.get_by_role("link", name="Resume…").click()
    await page.get_by_role("button", name="Yes, resume the run").click()
    await expect(page.get_by_role("status").filter(has_text="Run resumed.")).to_be_visible()
    await expect(page.locator("#run-state")).to_have_text("completed", timeout=30_000)
    await expect(page.locator("#live-note")).to_contain_text("The run is now completed")
    await expect(progress).to_have_text(re.compile(rf"^{ACCOUNTS} of {ACCOUNTS}"))

    # Drill down to the first account: its ledger steps, snapshot hash and receipt.
    await page.reload()
    account_link = page.get_by_role("table", name=re.compile("accounts in cohort order"))
    link = account_link.get_by_role("link").first
    account_id = (await link.inner_text()).strip()
    await link.click()
    await expect(page.get_by_role("heading", name=re.compile(account_id))).to_be_visible()
    async with db.transaction() as s:
        from sqlalchemy import select

        migration = (
            await s.execute(select(Migration).where(Migration.account_id == account_id))
        ).scalar_one()
    await expect(page.locator("#snapshot-hash")).to_have_text(migration.snapshot_hash or "?")
    steps = page.locator("#ledger tbody tr")
    assert await steps.count() >= 5
    await expect(page.locator("#ledger")).to_contain_text("cutover")
    await expect(page.locator("#receipt")).to_contain_text(migration.id)
    await expect(page.locator("#receipt")).to_contain_text('"signature"')
    await _accessible(page)
