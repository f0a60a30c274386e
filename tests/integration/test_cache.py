"""The Redis layer on a real Redis: one-shot OAuth state, the token cache, refresh locks, outages."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from redis.connection import SSLConnection

from token_manager.cache import (
    MAX_TOKEN_CACHE_TTL_SECONDS,
    STATE_TTL_SECONDS,
    CacheUnavailable,
    OAuthState,
    RedisCache,
    StateOutcome,
    blocked_key,
)
from token_manager.errors import StorageUnavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# A database index of our own on the shared test server, emptied around every test.
CACHE_TEST_DB = 5
# Distinctive markers: if either shows up in a log line or message, a secret leaked.
TOKEN_BLOB = "v1.k1.CIPHERTEXT-MARKER-9c41e7"
REDIS_PASSWORD = "redis-pw-MARKER-5d02aa"

STATE = "st-3k9Q"
USER = "user-42"
CALLBACK = "https://example.test/sonos/callback/"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache_url(redis_url: str) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{CACHE_TEST_DB}"))


@pytest.fixture
def server(cache_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking at keys and killing connections behind the cache's back."""
    client = redis.Redis.from_url(cache_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(cache_url: str, server: redis.Redis, clock: FakeClock) -> Iterator[RedisCache]:
    built = RedisCache.from_url(cache_url, clock=clock)
    yield built
    built._client.close()


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"


@pytest.fixture
def down_cache(unreachable_url: str, clock: FakeClock) -> RedisCache:
    return RedisCache.from_url(unreachable_url, clock=clock)


def warnings_from_cache(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "token_manager.cache" and r.levelno == logging.WARNING]


# --- killing a connection while its command is in flight -----------------------


@contextmanager
def writes_paused(server: redis.Redis) -> Iterator[None]:
    """CLIENT PAUSE WRITE holds write commands unanswered, while the admin connection can still
    run CLIENT LIST and CLIENT KILL: that is how a test catches a command mid-flight."""
    server.client_pause(10_000, all=False)
    try:
        yield
    finally:
        server.client_unpause()


def kill_when_blocked(server: redis.Redis, command: str) -> None:
    """Kill the connection waiting on ``command``, once the server holds it (bounded wait)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for client in server.client_list():
            if client["cmd"] == command and "b" in client["flags"]:
                server.client_kill_filter(_id=client["id"])
                return
        threading.Event().wait(0.002)
    pytest.fail(f"no connection ever waited on {command}")


def run_killed_mid_command(server: redis.Redis, command: str, call: Callable[[], Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except Exception as exc:
            outcome["error"] = exc

    with writes_paused(server):
        worker = threading.Thread(target=target)
        worker.start()
        kill_when_blocked(server, command)
        worker.join(timeout=10)
    assert not worker.is_alive()
    return outcome


@pytest.fixture
def patient_cache(cache_url: str, server: redis.Redis, clock: FakeClock) -> Iterator[RedisCache]:
    """A cache whose read timeout outlasts the kill, so the failure is the kill, not a timeout."""
    built = RedisCache.from_url(cache_url, socket_timeout=10, clock=clock)
    built.ping()
    yield built
    built._client.close()


# --- OAuth state -------------------------------------------------------------


def test_consume_state_returns_the_value_once_then_none(
    cache: RedisCache, server: redis.Redis, clock: FakeClock
) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))

    assert cache.consume_state(STATE) == OAuthState(user_id=USER, redirect_uri=CALLBACK, expires_at=clock.now + 600)
    assert cache.consume_state(STATE) is None
    assert not server.exists(f"sonos:oauth:state:{STATE}")


def test_put_state_stores_compact_json_for_ten_minutes(
    cache: RedisCache, server: redis.Redis, clock: FakeClock
) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))

    raw = server.get(f"sonos:oauth:state:{STATE}")
    assert raw is not None
    assert json.loads(raw) == {"user_id": USER, "redirect_uri": CALLBACK, "expires_at": clock.now + 600}
    assert " " not in raw
    assert STATE_TTL_SECONDS == 600
    assert 590 < server.ttl(f"sonos:oauth:state:{STATE}") <= 600


def test_c7_consume_state_records_pending_outcome_in_the_same_step(cache: RedisCache, server: redis.Redis) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))
    assert cache.get_outcome(STATE) is None

    cache.consume_state(STATE)

    assert cache.get_outcome(STATE) == StateOutcome(status="pending", user_id=USER)
    assert 590 < server.ttl(f"sonos:oauth:done:{STATE}") <= STATE_TTL_SECONDS


def test_c8_expired_state_is_not_consumed_and_records_no_outcome(cache: RedisCache, server: redis.Redis) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK), ttl_seconds=1)
    assert 0 < server.pttl(f"sonos:oauth:state:{STATE}") <= 1000
    # An expiry time in the past makes Redis expire the key now, without the test waiting.
    server.pexpireat(f"sonos:oauth:state:{STATE}", 1)

    assert cache.consume_state(STATE) is None
    assert cache.get_outcome(STATE) is None


def test_a_reopened_state_keeps_its_first_deadline_and_records_the_last_try(
    cache: RedisCache, server: redis.Redis, clock: FakeClock
) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))
    pending = cache.consume_state(STATE)
    assert pending is not None
    clock.now += 240  # the exchange failed four minutes into the state's ten
    last_try = StateOutcome(status="failed", user_id=USER, error_code="upstream_unavailable")

    assert cache.reopen_state(STATE, pending, last_try)

    assert 355_000 < server.pttl(f"sonos:oauth:state:{STATE}") <= 360_000  # not a fresh ten minutes
    assert 355_000 < server.pttl(f"sonos:oauth:done:{STATE}") <= 360_000
    assert cache.get_outcome(STATE) == last_try  # a repeat racing the reload sees why the last try failed
    assert cache.consume_state(STATE) == pending  # and the next callback takes the state again, once
    assert cache.consume_state(STATE) is None


@pytest.mark.parametrize("deadline", ["past", "unknown"])
def test_a_state_past_or_without_its_deadline_is_not_reopened(
    cache: RedisCache, server: redis.Redis, clock: FakeClock, deadline: str
) -> None:
    expires_at = None if deadline == "unknown" else clock.now - 0.001
    pending = OAuthState(user_id=USER, redirect_uri=CALLBACK, expires_at=expires_at)

    assert not cache.reopen_state(STATE, pending, StateOutcome(status="failed", user_id=USER))
    assert server.keys("*") == []


def test_a_state_stored_without_a_deadline_still_decodes(cache: RedisCache, server: redis.Redis) -> None:
    server.set(f"sonos:oauth:state:{STATE}", json.dumps({"user_id": USER, "redirect_uri": CALLBACK}), ex=600)

    assert cache.consume_state(STATE) == OAuthState(user_id=USER, redirect_uri=CALLBACK, expires_at=None)


def test_reopen_state_with_redis_down_answers_false(down_cache: RedisCache, clock: FakeClock) -> None:
    pending = OAuthState(user_id=USER, redirect_uri=CALLBACK, expires_at=clock.now + 60)

    assert not down_cache.reopen_state(STATE, pending, StateOutcome(status="failed", user_id=USER))


def test_c8_never_issued_state_is_none_and_records_no_outcome(cache: RedisCache, server: redis.Redis) -> None:
    assert cache.consume_state("never-issued") is None
    assert server.keys("*") == []


def test_malformed_state_value_is_treated_as_unknown(
    cache: RedisCache, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    server.set(f"sonos:oauth:state:{STATE}", "not json")

    assert cache.consume_state(STATE) is None
    assert cache.get_outcome(STATE) is None
    assert warnings_from_cache(caplog) == ["redis oauth state decode failed: MalformedValue"]


def test_c7_twenty_containers_consume_one_state_exactly_one_wins(
    cache: RedisCache, cache_url: str, server: redis.Redis, clock: FakeClock
) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))
    containers = [RedisCache.from_url(cache_url) for _ in range(20)]
    start = threading.Barrier(len(containers))

    def consume(container: RedisCache) -> OAuthState | None:
        start.wait()
        return container.consume_state(STATE)

    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        results = list(pool.map(consume, containers))

    winner = OAuthState(user_id=USER, redirect_uri=CALLBACK, expires_at=clock.now + 600)
    assert [r for r in results if r is not None] == [winner]
    assert cache.get_outcome(STATE) == StateOutcome(status="pending", user_id=USER)


@pytest.mark.parametrize(
    "outcome",
    [
        StateOutcome(status="linked", user_id=USER, household_id="Sonos_HH1"),
        StateOutcome(status="failed", user_id=USER, error_code="access_denied"),
        StateOutcome(status="pending", user_id=USER),
    ],
    ids=["linked", "failed", "pending"],
)
def test_record_outcome_round_trips(cache: RedisCache, server: redis.Redis, outcome: StateOutcome) -> None:
    cache.record_outcome(STATE, outcome, ttl_seconds=120)

    assert cache.get_outcome(STATE) == outcome
    raw = server.get(f"sonos:oauth:done:{STATE}")
    assert raw is not None
    assert " " not in raw
    assert None not in json.loads(raw).values()
    assert 110 < server.ttl(f"sonos:oauth:done:{STATE}") <= 120


def test_record_outcome_replaces_pending(cache: RedisCache) -> None:
    cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))
    cache.consume_state(STATE)

    cache.record_outcome(STATE, StateOutcome(status="linked", user_id=USER, household_id="Sonos_HH1"))

    assert cache.get_outcome(STATE) == StateOutcome(status="linked", user_id=USER, household_id="Sonos_HH1")


@pytest.mark.parametrize(
    "raw",
    ['{"status":"done","user_id":"u"}', '{"status":"linked"}', '["linked"]', "{", '{"status":"linked","user_id":7}'],
)
def test_malformed_outcome_reads_as_none(cache: RedisCache, server: redis.Redis, raw: str) -> None:
    server.set(f"sonos:oauth:done:{STATE}", raw)

    assert cache.get_outcome(STATE) is None


@pytest.mark.parametrize(
    "operation",
    [
        lambda c: c.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK)),
        lambda c: c.consume_state(STATE),
        lambda c: c.record_outcome(STATE, StateOutcome(status="linked", user_id=USER)),
        lambda c: c.get_outcome(STATE),
    ],
    ids=["put_state", "consume_state", "record_outcome", "get_outcome"],
)
def test_state_operations_raise_storage_unavailable_when_redis_is_unreachable(
    down_cache: RedisCache, caplog: pytest.LogCaptureFixture, operation: Callable[[RedisCache], object]
) -> None:
    with pytest.raises(StorageUnavailable) as raised:
        operation(down_cache)

    # The caller sees the generic message: no host, port or password.
    assert raised.value.message == StorageUnavailable.default_message
    assert raised.value.__cause__ is None
    lines = warnings_from_cache(caplog)
    assert len(lines) == 1
    assert lines[0].endswith("failed: ConnectionError")
    assert REDIS_PASSWORD not in caplog.text


def test_consume_state_killed_mid_command_raises_storage_unavailable_and_keeps_the_state(
    patient_cache: RedisCache, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    patient_cache.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))

    outcome = run_killed_mid_command(server, "evalsha", lambda: patient_cache.consume_state(STATE))

    assert isinstance(outcome.get("error"), StorageUnavailable)
    assert warnings_from_cache(caplog) == ["redis oauth state consume failed: ConnectionError"]
    # The killed command never ran, so a retried callback can still complete the link.
    kept = patient_cache.consume_state(STATE)
    assert kept is not None
    assert (kept.user_id, kept.redirect_uri) == (USER, CALLBACK)


# --- token cache ---------------------------------------------------------------


def test_token_cache_round_trip_and_delete(cache: RedisCache, server: redis.Redis) -> None:
    assert cache.get_token(USER) is None

    cache.set_token(USER, TOKEN_BLOB, ttl_seconds=120)

    assert cache.get_token(USER) == TOKEN_BLOB
    assert server.get(f"sonos:token:{USER}") == TOKEN_BLOB
    assert cache.delete_token(USER) is True
    assert cache.get_token(USER) is None
    assert cache.delete_token(USER) is True


def test_set_token_clamps_ttl_to_one_hour(cache: RedisCache, server: redis.Redis) -> None:
    cache.set_token(USER, TOKEN_BLOB, ttl_seconds=86_399)

    assert MAX_TOKEN_CACHE_TTL_SECONDS == 3600
    assert 3590 < server.ttl(f"sonos:token:{USER}") <= 3600


def test_set_token_keeps_a_shorter_ttl_to_the_millisecond(cache: RedisCache, server: redis.Redis) -> None:
    cache.set_token(USER, TOKEN_BLOB, ttl_seconds=1.5)

    assert 1000 < server.pttl(f"sonos:token:{USER}") <= 1500


@pytest.mark.parametrize("ttl_seconds", [0, -5, 0.0004], ids=["zero", "negative", "under-a-millisecond"])
def test_set_token_without_positive_ttl_writes_nothing_and_drops_the_old_entry(
    cache: RedisCache, server: redis.Redis, ttl_seconds: float
) -> None:
    cache.set_token(USER, "older-blob", ttl_seconds=600)

    cache.set_token(USER, TOKEN_BLOB, ttl_seconds=ttl_seconds)

    assert not server.exists(f"sonos:token:{USER}")
    assert cache.get_token(USER) is None


def test_token_cache_misses_and_skips_when_redis_is_unreachable(
    down_cache: RedisCache, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        assert down_cache.get_token(USER) is None
        down_cache.set_token(USER, TOKEN_BLOB, ttl_seconds=300)
    assert down_cache.delete_token(USER) is False

    assert sorted(warnings_from_cache(caplog)) == [
        "redis token cache delete failed: ConnectionError",
        "redis token cache read failed: ConnectionError",
        "redis token cache write failed: ConnectionError",
    ]
    assert "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert TOKEN_BLOB not in caplog.text
    assert REDIS_PASSWORD not in caplog.text


def test_failure_lines_are_limited_per_operation_and_error_class_and_count_suppressed(
    down_cache: RedisCache, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(4):
        down_cache.get_token(USER)
    clock.now += 59
    down_cache.get_token(USER)
    down_cache.set_token(USER, TOKEN_BLOB, ttl_seconds=300)
    assert warnings_from_cache(caplog) == [
        "redis token cache read failed: ConnectionError",
        "redis token cache write failed: ConnectionError",
    ]

    clock.now += 1
    down_cache.get_token(USER)
    down_cache.get_token(USER)

    assert warnings_from_cache(caplog)[2:] == [
        "redis token cache read failed: ConnectionError (4 more since the last report)"
    ]
    clock.now += 60
    down_cache.get_token(USER)
    assert warnings_from_cache(caplog)[3:] == [
        "redis token cache read failed: ConnectionError (1 more since the last report)"
    ]


def test_token_write_killed_mid_command_is_skipped_then_the_next_call_reconnects(
    patient_cache: RedisCache, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Fills go through the set-unless-blocked script.
    outcome = run_killed_mid_command(server, "evalsha", lambda: patient_cache.set_token(USER, TOKEN_BLOB, 300))

    assert outcome == {"result": None}
    assert warnings_from_cache(caplog) == ["redis token cache write failed: ConnectionError"]
    assert TOKEN_BLOB not in caplog.text
    assert patient_cache.get_token(USER) is None
    patient_cache.set_token(USER, TOKEN_BLOB, 300)
    assert patient_cache.get_token(USER) == TOKEN_BLOB


def test_connection_killed_while_idle_is_replaced_without_a_failure(
    cache: RedisCache, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cache.set_token(USER, TOKEN_BLOB, 300)
    idle = [c["id"] for c in server.client_list() if c["db"] == str(CACHE_TEST_DB) and c["cmd"] == "evalsha"]
    assert len(idle) == 1
    server.client_kill_filter(_id=idle[0])

    assert cache.get_token(USER) == TOKEN_BLOB
    assert warnings_from_cache(caplog) == []


# --- refresh lock ----------------------------------------------------------------


def test_acquire_lock_once_then_none_while_held(cache: RedisCache, server: redis.Redis) -> None:
    owner = cache.acquire_lock(USER, ttl_seconds=10)

    assert owner is not None
    assert len(owner) >= 20
    assert server.get(f"sonos:lock:refresh:{USER}") == owner
    assert cache.acquire_lock(USER, ttl_seconds=10) is None
    assert cache.lock_held(USER) is True
    assert cache.acquire_lock("someone-else", ttl_seconds=10) not in (None, owner)


def test_release_by_a_non_owner_fails_and_the_lock_stays(cache: RedisCache, server: redis.Redis) -> None:
    owner = cache.acquire_lock(USER, ttl_seconds=10)

    assert cache.release_lock(USER, "not-the-owner") is False
    assert server.get(f"sonos:lock:refresh:{USER}") == owner


def test_owner_release_frees_the_lock(cache: RedisCache) -> None:
    owner = cache.acquire_lock(USER, ttl_seconds=10)
    assert owner is not None

    assert cache.release_lock(USER, owner) is True
    assert cache.lock_held(USER) is False
    assert cache.release_lock(USER, owner) is False
    assert cache.acquire_lock(USER, ttl_seconds=10) is not None


def test_lock_expires_by_px_and_a_stale_owner_cannot_release_the_next_lock(
    cache: RedisCache, server: redis.Redis
) -> None:
    stale = cache.acquire_lock(USER, ttl_seconds=2.5)
    assert stale is not None
    assert 2000 < server.pttl(f"sonos:lock:refresh:{USER}") <= 2500
    # An expiry time in the past makes Redis expire the lock now, as its PX would.
    server.pexpireat(f"sonos:lock:refresh:{USER}", 1)
    assert cache.lock_held(USER) is False

    fresh = cache.acquire_lock(USER, ttl_seconds=10)

    assert fresh is not None
    assert cache.release_lock(USER, stale) is False
    assert server.get(f"sonos:lock:refresh:{USER}") == fresh


def test_delete_lock_removes_it_whoever_holds_it(cache: RedisCache) -> None:
    cache.acquire_lock(USER, ttl_seconds=10)

    cache.delete_lock(USER)

    assert cache.lock_held(USER) is False


def test_c2_twenty_containers_race_for_the_lock_exactly_one_owner(
    cache: RedisCache, cache_url: str, server: redis.Redis
) -> None:
    containers = [RedisCache.from_url(cache_url) for _ in range(20)]
    start = threading.Barrier(len(containers))

    def acquire(container: RedisCache) -> str | None:
        start.wait()
        return container.acquire_lock(USER, ttl_seconds=10)

    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        owners = [o for o in pool.map(acquire, containers) if o is not None]

    assert len(owners) == 1
    assert server.get(f"sonos:lock:refresh:{USER}") == owners[0]


def test_lock_operations_when_redis_is_unreachable(down_cache: RedisCache, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CacheUnavailable, match=r"^redis refresh lock acquire failed: ConnectionError$"):
        down_cache.acquire_lock(USER, ttl_seconds=10)
    with pytest.raises(CacheUnavailable, match=r"^redis refresh lock check failed: ConnectionError$"):
        down_cache.lock_held(USER)

    assert down_cache.release_lock(USER, "owner") is False
    down_cache.delete_lock(USER)

    assert sorted(warnings_from_cache(caplog)) == [
        "redis refresh lock delete failed: ConnectionError",
        "redis refresh lock release failed: ConnectionError",
    ]
    assert REDIS_PASSWORD not in caplog.text


def test_acquire_lock_killed_mid_command_raises_cache_unavailable(
    patient_cache: RedisCache, server: redis.Redis
) -> None:
    outcome = run_killed_mid_command(server, "set", lambda: patient_cache.acquire_lock(USER, ttl_seconds=10))

    assert isinstance(outcome.get("error"), CacheUnavailable)
    assert str(outcome["error"]) == "redis refresh lock acquire failed: ConnectionError"
    assert patient_cache.acquire_lock(USER, ttl_seconds=10) is not None


# --- connection set-up -------------------------------------------------------------


def test_injected_client_returning_bytes_works(cache_url: str, server: redis.Redis) -> None:
    client = redis.Redis.from_url(cache_url)  # no decode_responses: replies are bytes
    injected = RedisCache(client)
    injected.put_state(STATE, OAuthState(user_id=USER, redirect_uri=CALLBACK))
    injected.set_token(USER, TOKEN_BLOB, ttl_seconds=60)

    consumed = injected.consume_state(STATE)
    assert consumed is not None
    assert (consumed.user_id, consumed.redirect_uri) == (USER, CALLBACK)
    assert injected.get_outcome(STATE) == StateOutcome(status="pending", user_id=USER)
    assert injected.get_token(USER) == TOKEN_BLOB
    client.close()


def test_ping_reports_reachability(cache: RedisCache, down_cache: RedisCache) -> None:
    assert cache.ping() is True
    assert down_cache.ping() is False


def test_rediss_url_builds_a_verified_tls_connection_without_retries() -> None:
    built = RedisCache.from_url(f"rediss://:{REDIS_PASSWORD}@master.example.cache.amazonaws.com:6379/2")
    pool = built._client.connection_pool

    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["host"] == "master.example.cache.amazonaws.com"
    assert kwargs["db"] == 2
    assert kwargs["socket_timeout"] == 0.5
    assert kwargs["socket_connect_timeout"] == 0.5
    assert kwargs.get("ssl_cert_reqs", "required") == "required"
    assert kwargs.get("ssl_check_hostname", True) is True
    assert kwargs["retry"].get_retries() == 0
    assert REDIS_PASSWORD not in repr(built._client)


def test_plain_redis_url_builds_a_tcp_connection() -> None:
    built = RedisCache.from_url("redis://127.0.0.1:6379/0", socket_timeout=0.2, connect_timeout=0.1)
    pool = built._client.connection_pool

    assert pool.connection_class is not SSLConnection
    assert pool.connection_kwargs["socket_timeout"] == 0.2
    assert pool.connection_kwargs["socket_connect_timeout"] == 0.1


def test_importing_the_cache_module_does_not_import_redis() -> None:
    # `import redis` costs ~110-195 ms of cold start; it loads only when a cache is built.
    probe = "import sys, token_manager.cache; sys.exit('redis' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "layers" / "token_manager")}

    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=False)

    assert result.returncode == 0, result.stderr.decode()


def test_blocked_user_refuses_fills_until_unblocked(cache: RedisCache, server: redis.Redis) -> None:
    cache.set_token(USER, TOKEN_BLOB, 300)
    assert cache.block_token(USER) is True
    assert cache.get_token(USER) is None
    cache.set_token(USER, TOKEN_BLOB, 300)  # a fill that raced with revoke or expiry
    assert cache.get_token(USER) is None
    assert 3590 < server.ttl(blocked_key(USER)) <= 3600
    assert cache.unblock_token(USER) is True
    cache.set_token(USER, TOKEN_BLOB, 300)
    assert cache.get_token(USER) == TOKEN_BLOB


def test_block_and_unblock_report_failure_when_redis_is_down(down_cache: RedisCache) -> None:
    assert down_cache.block_token(USER) is False
    assert down_cache.unblock_token(USER) is False
