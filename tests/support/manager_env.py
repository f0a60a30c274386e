"""A wired SonosTokenManager on the real Redis and Postgres, with Sonos behind `responses`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import responses

from token_manager.cache import RedisCache
from token_manager.crypto import KeyRing, TokenCipher
from token_manager.manager import SonosTokenManager
from token_manager.provider import SonosClient, SonosClientConfig
from token_manager.store.postgres import PostgresTokenStore

CLIENT_ID = "client-id-test"
CLIENT_SECRET = "client-secret-MARKER-5b1f0c2e"
AUTH_BASE = "https://api.sonos.test"
CONTROL_BASE = "https://control.sonos.test/control/api/v1"
TOKEN_URL = AUTH_BASE + "/login/v3/oauth/access"
HOUSEHOLDS_URL = CONTROL_BASE + "/households"
REDIRECT_URI = "https://example.test/sonos/callback/"
START = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class Clock:
    """A settable wall clock for the manager's due-time decisions."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@dataclass
class RecordingNotifier:
    events: list[tuple[str, str]] = field(default_factory=list)

    def reconnect_required(self, user_id: str, reason: str) -> None:
        self.events.append((user_id, reason))


@dataclass
class ManagerEnv:
    database_url: str
    redis_url: str
    ring: KeyRing
    clock: Clock
    notifier: RecordingNotifier
    sleeps: list[float]
    secrets: set[str]
    managers: list[SonosTokenManager] = field(default_factory=list)

    def manager(self, **overrides: Any) -> SonosTokenManager:
        """A manager as a fresh container would build it (own connections)."""
        config = SonosClientConfig(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            auth_base_url=AUTH_BASE,
            control_base_url=CONTROL_BASE,
            revoke_url=overrides.pop("revoke_url", ""),
        )
        kwargs: dict[str, Any] = {
            "store": PostgresTokenStore(self.database_url),
            "cache": RedisCache.from_url(self.redis_url),
            "cipher": TokenCipher(self.ring),
            "sonos": SonosClient(config, sleep=self.sleeps.append),
            "notifier": self.notifier,
            "redirect_uris": (REDIRECT_URI,),
            "clock": self.clock,
        }
        kwargs.update(overrides)
        manager = SonosTokenManager(**kwargs)
        self.managers.append(manager)
        return manager

    def token_json(
        self, access: str, refresh: str | None = "absent", expires_in: object = 86399, **extra: object
    ) -> dict[str, object]:
        """A Sonos token response body; every token value is registered as a secret."""
        self.secrets.add(access)
        body: dict[str, object] = {"access_token": access, "token_type": "Bearer", "expires_in": expires_in}
        body["scope"] = "playback-control-all"
        if refresh != "absent":
            body["refresh_token"] = refresh
            if refresh:
                self.secrets.add(refresh)
        body.update(extra)
        return body

    def link(
        self,
        rsps: responses.RequestsMock,
        user_id: str = "user-1",
        *,
        access: str = "access-MARKER-link-0001",
        refresh: str = "refresh-MARKER-link-0001",
        expires_in: object = 86399,
        households: tuple[str, ...] = ("Sonos_HH1",),
    ) -> None:
        """Initiate + callback through a manager, answering Sonos with the given tokens."""
        manager = self.manager()
        request = manager.initiate_oauth_flow(user_id)
        code = f"code-MARKER-{user_id}"
        self.secrets.add(code)
        exchange = rsps.add(responses.POST, TOKEN_URL, json=self.token_json(access, refresh, expires_in))
        hh = rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": h} for h in households]})
        manager.handle_oauth_callback(code, request.state)
        rsps.remove(exchange)
        rsps.remove(hh)
        rsps.calls.reset()  # tests count only the requests their own step makes

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


def form(request: Any) -> dict[str, str]:
    """The form-urlencoded body of a recorded request."""
    body = request.body if isinstance(request.body, str) else request.body.decode()
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def token_calls(rsps: responses.RequestsMock) -> list[Any]:
    return [c for c in rsps.calls if c.request.url == TOKEN_URL]


def json_callback(
    body_for_call: Callable[[int], tuple[int, dict[str, object]]],
) -> Callable[[Any], tuple[int, dict[str, str], str]]:
    """A `responses` callback answering the n-th call (0-based) with ``body_for_call(n)``."""
    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        with lock:
            n = next(counter)
        status, body = body_for_call(n)
        return status, {"Content-Type": "application/json"}, json.dumps(body)

    return callback


def iter_log_texts(records: Iterator[Any]) -> Iterator[str]:
    for record in records:
        yield record.getMessage()
        yield json.dumps(record.__dict__, default=str)
