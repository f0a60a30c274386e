"""The six handlers on the real Redis and Postgres, with the Sonos stand-in over real HTTP.

What a caller sees is what these tests check: each call goes through a handler
(``functions/<name>/app.py``) as a direct invoke or an API Gateway proxy event. The
stand-in is the Sonos cloud (consent, token endpoint, households, fault knobs); waits
between retries are recorded, never slept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any, LiteralString
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis
from psycopg.rows import dict_row

from devtools.sonos_standin import SonosStandIn, StandInConfig
from tests.support.answer_checks import ERROR_STATUS
from tests.support.handlers import (
    LambdaContextStub,
    captured_service_logs,
    handler_environment,
    load_handler,
)
from tests.support.handlers import api_event as handler_api_event
from tests.support.secret_guard import SecretGuard, without_fetched_token
from token_manager import runtime
from token_manager.crypto import KeyRing, TokenCipher

CLIENT_ID = "client-id-faults"
CLIENT_SECRET = "client-secret-MARKER-faults-3c9d"
REDIRECT_URI = "http://127.0.0.1:3000/sonos/oauth/callback"  # what the sample API events ask for
USER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"  # the user every sample event names


# Columns that hold the grant itself; a fault may bump the bookkeeping (version, failure
# count, timestamps) but must never change these unless the test says so.
GRANT_COLUMNS = (
    "user_id",
    "household_id",
    "household_ids",
    "access_token_encrypted",
    "refresh_token_encrypted",
    "encryption_key_id",
    "expires_at",
    "scope",
    "token_status",
    "last_refreshed_at",
    "created_at",
)

Rows = dict[str, dict[str, Any]]


def base_environment(*, stand_in: SonosStandIn, ring: KeyRing, database_url: str, redis_url: str) -> dict[str, str]:
    """Every setting the handlers read, pointed at the stand-in and the test's services."""
    return handler_environment(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        key_ring_json=ring.to_json(),
        database_url=database_url,
        redis_url=redis_url,
        auth_base_url=stand_in.url,
        control_base_url=stand_in.control_url,
    )


def standin_config(**overrides: Any) -> StandInConfig:
    # hang_seconds: a hung request holds a stand-in thread; the client gives up long before.
    return StandInConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, hang_seconds=2.0, **overrides)


@dataclass
class Linked:
    user_id: str
    access_token: str
    refresh_token: str


@dataclass
class ServiceWorld:
    monkeypatch: pytest.MonkeyPatch
    stand_in: SonosStandIn
    database_url: str
    redis_url: str
    ring: KeyRing
    guard: SecretGuard
    logs: Any
    sleeps: list[float] = field(default_factory=list)
    handlers: dict[str, ModuleType] = field(default_factory=dict)

    # -- invoking --------------------------------------------------------------------

    def invoke(self, function: str, event: Any) -> Any:
        """Invoke a function's handler in this (warm) container."""
        if function not in self.handlers:
            self.handlers[function] = load_handler(function)
        answer = self.handlers[function].lambda_handler(event, LambdaContextStub())
        self.guard.seen(without_fetched_token(answer), f"the {function} answer")
        return answer

    def new_container(self) -> None:
        """What a fresh Lambda container has: nothing built, handler modules loaded anew."""
        runtime.reset_for_tests(sleep=self.sleeps.append)
        self.handlers.clear()

    # -- the OAuth flow ----------------------------------------------------------------

    def initiate(self, user_id: str = USER) -> dict[str, Any]:
        answer: dict[str, Any] = self.invoke("oauth_initiate", {"userId": user_id})
        return answer

    def consent(self, authorization_url: str) -> dict[str, str]:
        """Press Allow on the stand-in's consent page; the callback's query (code and state)."""
        location = self.stand_in.approve(authorization_url, account=f"account-of-{authorization_url[-12:]}")
        query = {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}
        self.guard.add(query.get("code"))
        return query

    def callback(self, query: dict[str, str]) -> dict[str, Any]:
        answer: dict[str, Any] = self.invoke("oauth_callback", api_event("oauth_callback_api.json", query=query))
        return answer

    def link(self, user_id: str = USER) -> Linked:
        """The whole flow through the initiate and callback handlers; the grant's plaintext tokens."""
        started = self.initiate(user_id)
        assert "authorizationUrl" in started, started
        answer = self.callback(self.consent(started["authorizationUrl"]))
        assert answer["statusCode"] == 200, answer
        access, refresh = self.tokens_of(user_id)
        return Linked(user_id, access, refresh)

    # -- fetch ---------------------------------------------------------------------------

    def fetch(self, user_id: str = USER) -> dict[str, Any]:
        answer: dict[str, Any] = self.invoke("token_fetch", {"userId": user_id})
        return answer

    def fetch_api(self, user_id: str = USER) -> dict[str, Any]:
        answer: dict[str, Any] = self.invoke(
            "token_fetch", api_event("token_fetch_api.json", query={"userId": user_id})
        )
        return answer

    # -- the database ----------------------------------------------------------------------

    def rows(self) -> Rows:
        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as connection:
            found = connection.execute("select * from sonos_tokens order by user_id").fetchall()
        return {row["user_id"]: dict(row) for row in found}

    def row(self, user_id: str = USER) -> dict[str, Any] | None:
        return self.rows().get(user_id)

    def execute(self, statement: LiteralString, *params: object) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            connection.execute(statement, params)

    def expire_in(self, seconds: int, user_id: str = USER) -> None:
        """Move the grant's expiry to ``seconds`` from now (a day-long token issued a day
        earlier, so the usual refresh-ahead window applies) and drop its cached token."""
        self.execute(
            "update sonos_tokens set expires_at = now() + make_interval(secs => %s),"
            " last_refreshed_at = now() + make_interval(secs => %s) - interval '86399 seconds'"
            " where user_id = %s",
            seconds,
            seconds,
            user_id,
        )
        self.flush_cache()

    def tokens_of(self, user_id: str = USER, ring: KeyRing | None = None) -> tuple[str, str]:
        """The grant's (access, refresh) tokens as stored, decrypted."""
        row = self.row(user_id)
        assert row is not None, f"no grant for {user_id}"
        cipher = TokenCipher(ring or self.ring)
        access = cipher.decrypt(
            row["access_token_encrypted"], key_id=row["encryption_key_id"], user_id=user_id, field="access_token"
        )
        refresh = cipher.decrypt(
            row["refresh_token_encrypted"], key_id=row["encryption_key_id"], user_id=user_id, field="refresh_token"
        )
        self.guard.add(access, refresh)
        return access, refresh

    # -- Redis -----------------------------------------------------------------------------

    def use_redis_at(self, port: int) -> None:
        """Point the service (not the test's own Redis access) at another port, in a new container."""
        self.monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
        self.new_container()

    def flush_cache(self) -> None:
        redis.Redis.from_url(self.redis_url).flushdb()


def assert_grant_unchanged(before: Rows, after: Rows, *users: str) -> None:
    """The grant columns of ``users`` (all, when none given) are exactly as they were."""
    names = users or tuple(before)
    assert set(after) >= set(names), f"rows lost: {sorted(set(names) - set(after))}"
    for user in names:
        was = {name: before[user][name] for name in GRANT_COLUMNS}
        now = {name: after[user][name] for name in GRANT_COLUMNS}
        assert now == was, f"grant of {user} changed"


def assert_api_error(answer: dict[str, Any], code: str) -> None:
    """An API answer in the error shape of DESIGN.md section 3."""
    assert answer["statusCode"] == ERROR_STATUS[code], answer
    body = json.loads(answer["body"])
    assert body == {"error": {"code": code, "message": body["error"]["message"]}}, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


def assert_direct_error(answer: dict[str, Any], code: str) -> None:
    """A direct-invoke answer in the error shape of DESIGN.md section 3."""
    assert set(answer) == {"error"}, answer
    assert answer["error"] == {"code": code, "message": answer["error"]["message"], "status": ERROR_STATUS[code]}
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["message"]


def api_event(file_name: str, *, query: dict[str, str] | None = None, body: Any = None) -> dict[str, Any]:
    """A sample API Gateway event (events/) with its query string and body both replaced."""
    return dict(handler_api_event(file_name, query=query, body=body))


def parse_expires_at(answer: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(answer["expiresAt"]).replace("Z", "+00:00"))


def service_world(
    *,
    monkeypatch: pytest.MonkeyPatch,
    guard: SecretGuard,
    database_url: str,
    redis_url: str,
    config: StandInConfig | None = None,
) -> Iterator[ServiceWorld]:
    """Generator for a fixture: an empty table and Redis, a running stand-in, a fresh container."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("truncate sonos_tokens")
    redis.Redis.from_url(redis_url).flushdb()
    ring = KeyRing.generate()
    with ExitStack() as stack:
        stand_in = stack.enter_context(SonosStandIn(config or standin_config()))
        logs = stack.enter_context(captured_service_logs())
        for name, value in base_environment(
            stand_in=stand_in, ring=ring, database_url=database_url, redis_url=redis_url
        ).items():
            monkeypatch.setenv(name, value)
        guard.add(CLIENT_SECRET)
        guard.add_key_ring(ring.to_json())
        world = ServiceWorld(monkeypatch, stand_in, database_url, redis_url, ring, guard, logs)
        world.new_container()
        try:
            yield world
        finally:
            runtime.reset_for_tests()
            guard.seen(logs.getvalue(), "the service's log lines")
