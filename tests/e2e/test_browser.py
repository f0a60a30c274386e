"""A real browser links Sonos through the local API and the stand-in's consent page; no token ever reaches it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import requests
from psycopg.rows import dict_row

from devtools.local_stack import LocalStack
from devtools.sonos_standin import StandInConfig
from tests.e2e.webdriver import CHROMEDRIVER, CHROMIUM, Browser, headless_chromium

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    # Powertools warns when an invocation emits no metric but the cold start (initiate, say).
    pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
HOUSEHOLDS = 2


@pytest.fixture(scope="module")
def stack(redis_url: str, database_url: str) -> Iterator[LocalStack]:
    from token_manager import runtime

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium / chromedriver are missing: run scripts/ensure-chromium.sh (make test does)")
    runtime.reset_for_tests()  # the handlers wire themselves from the settings this stack seeds
    with LocalStack(
        redis_url=redis_url, database_url=database_url, standin_config=StandInConfig(households=HOUSEHOLDS)
    ) as local:
        yield local
    runtime.reset_for_tests()


@pytest.fixture(scope="module")
def browser(stack: LocalStack) -> Iterator[Browser]:
    with headless_chromium() as chromium:
        yield chromium


@pytest.fixture
def user_id() -> str:
    return f"browser-user-{uuid.uuid4().hex[:10]}"


def _row(database_url: str, user_id: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute("select * from sonos_tokens where user_id = %s", (user_id,)).fetchone()


def _stored_tokens(stack: LocalStack, row: dict[str, Any]) -> set[str]:
    from token_manager.crypto import KeyRing, TokenCipher

    cipher = TokenCipher(KeyRing.from_json(stack.key_ring_json))
    return {
        cipher.decrypt(row[column], key_id=row["encryption_key_id"], user_id=row["user_id"], field=field)
        for column, field in (("access_token_encrypted", "access_token"), ("refresh_token_encrypted", "refresh_token"))
    }


class _Visit:
    """What the browser saw: every URL it requested or was at, and every page it rendered."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.urls: list[str] = []
        self.pages: list[str] = []
        browser.requested_urls()  # start from a clean performance log

    def look(self) -> None:
        self.urls.append(self.browser.location_href())
        self.pages.append(self.browser.page_source)

    def finish(self) -> None:
        self.urls.extend(self.browser.requested_urls())

    def leaks(self, secrets: set[str]) -> list[str]:
        texts = [*self.urls, *self.pages]
        return [secret[:6] + "..." for secret in secrets if any(secret in text for text in texts)]


def _connect_and_decide(browser: Browser, stack: LocalStack, user_id: str, button: str) -> _Visit:
    visit = _Visit(browser)
    browser.get(f"{stack.api.url}/?userId={user_id}")
    browser.wait_for("#connect")
    visit.look()
    browser.click("#connect")  # POSTs initiate for the user and redirects to the authorization URL
    browser.wait_for_url(stack.stand_in.url + "/login/v3/oauth?")
    browser.wait_for(button)
    visit.look()
    browser.click(button)  # the consent form posts the decision; Sonos redirects to our callback
    browser.wait_for_url(stack.redirect_uri + "?")
    browser.wait_for("main h1")
    visit.look()
    return visit


def test_allow_links_sonos_shows_success_and_no_token_reaches_the_browser(
    stack: LocalStack, browser: Browser, user_id: str, database_url: str
) -> None:
    exchanges_before = stack.stand_in.counts()["token_code"]

    visit = _connect_and_decide(browser, stack, user_id, "#allow")
    title, text = browser.title, browser.text_of("main")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser-success.png").write_bytes(browser.screenshot_png())
    browser.get(f"{stack.api.url}/?userId={user_id}")  # the start page now fetches the token to show the link
    browser.wait_for("#status")
    status = browser.text_of("#status")
    visit.look()
    visit.finish()

    assert title == "Sonos is connected"
    assert "linked" in text
    assert status.startswith("Connected")
    row = _row(database_url, user_id)
    assert row is not None
    assert row["token_status"] == "active"
    assert len(row["household_ids"]) == HOUSEHOLDS
    assert stack.stand_in.counts()["token_code"] == exchanges_before + 1
    fetched = requests.get(stack.api.url + "/sonos/token", params={"userId": user_id}, timeout=10)
    assert fetched.status_code == 200
    secrets = {fetched.json()["accessToken"], *_stored_tokens(stack, row), stack.settings["SONOS_CLIENT_SECRET"]}
    # The log really holds the journey, so finding no token in it means something.
    assert any(url.startswith(stack.stand_in.url + "/login/v3/oauth?") for url in visit.urls)
    assert any(url.startswith(stack.redirect_uri + "?code=") for url in visit.urls)
    assert visit.leaks(secrets) == []


def test_deny_shows_the_denied_page_and_stores_nothing(
    stack: LocalStack, browser: Browser, user_id: str, database_url: str, redis_url: str
) -> None:
    exchanges_before = stack.stand_in.counts()["token_code"]

    visit = _connect_and_decide(browser, stack, user_id, "#deny")
    title, text = browser.title, browser.text_of("main")
    visit.finish()

    assert title == "Sonos was not connected"
    assert "not allowed" in text
    assert _row(database_url, user_id) is None
    assert stack.stand_in.counts()["token_code"] == exchanges_before
    client = redis.Redis.from_url(redis_url)
    assert client.exists(f"sonos:token:{user_id}") == 0
    assert any("error=access_denied" in url for url in visit.urls if url.startswith(stack.redirect_uri))
    assert visit.leaks({stack.settings["SONOS_CLIENT_SECRET"]}) == []
