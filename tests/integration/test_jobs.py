"""The scheduled jobs on the real Redis and Postgres: background refresher and key rotation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import responses

from tests.support.answer_checks import refresher_summary
from tests.support.manager_env import TOKEN_URL, Clock, ManagerEnv, RecordingNotifier, form, token_calls
from token_manager.cache import RedisCache
from token_manager.crypto import KeyRing, TokenCipher
from token_manager.key_rotation import run_key_rotation
from token_manager.manager import SonosTokenManager
from token_manager.models import TokenStatus
from token_manager.refresher import PAGE_SIZE, RefresherSummary, run_refresher

pytestmark = pytest.mark.integration


@pytest.fixture
def env(database_url: str, redis_url: str) -> ManagerEnv:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("truncate sonos_tokens")
    RedisCache.from_url(redis_url)._client.flushdb()
    return ManagerEnv(
        database_url=database_url,
        redis_url=redis_url,
        ring=KeyRing.generate(),
        clock=Clock(),
        notifier=RecordingNotifier(),
        sleeps=[],
        secrets=set(),
    )


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def set_expiry(env: ManagerEnv, user_id: str, seconds_from_now: float) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute(
            "update sonos_tokens set expires_at = %s, last_refreshed_at = %s where user_id = %s",
            (env.clock.now + timedelta(seconds=seconds_from_now), env.clock.now - timedelta(days=1), user_id),
        )


def run_every_five_minutes(
    env: ManagerEnv,
    manager: SonosTokenManager,
    *,
    concurrency: int,
    page_size: int = PAGE_SIZE,
    remaining_ms: Callable[[], int] = lambda: 200_000,
) -> RefresherSummary:
    """One refresher run as the schedule makes it: every 5 minutes, a 5-minute refresh window."""
    return run_refresher(
        manager,
        manager._store,
        now=env.clock.now,
        period_seconds=300,
        refresh_ahead_seconds=300,
        concurrency=concurrency,
        remaining_ms=remaining_ms,
        page_size=page_size,
    )


def test_refresher_refreshes_what_comes_due_and_reports_each_outcome(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    users = ["due-ok", "due-locked", "due-rejected", "due-down", "later", "far"]
    for user in users:
        env.link(rsps, user, access=f"access-MARKER-{user}", refresh=f"refresh-MARKER-{user}")
    for user in users[:4]:
        set_expiry(env, user, 300 + 200)  # refresh point in 200 s: before the next run (300 s)
    set_expiry(env, "later", 300 + 300 + 100)  # due only after the next run: not scanned
    env.redis().set("sonos:lock:refresh:due-locked", "another-container")

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        refresh = form(request)["refresh_token"]
        if refresh == "refresh-MARKER-due-rejected":
            return 400, {}, json.dumps({"error": "invalid_grant"})
        if refresh == "refresh-MARKER-due-down":
            return 503, {}, "{}"
        return 200, {}, json.dumps(env.token_json("access-MARKER-new", "refresh-MARKER-new"))

    rsps.add_callback(responses.POST, TOKEN_URL, callback=answer)
    manager = env.manager()
    summary = run_every_five_minutes(env, manager, concurrency=4, page_size=2)
    assert summary.to_dict() == refresher_summary(
        scanned=4, refreshed=1, failedTransient=1, failedPermanent=1, skipped=1
    )
    store = manager._store
    assert store.get("due-rejected").token_status is TokenStatus.EXPIRED
    assert env.notifier.events == [("due-rejected", "invalid_grant")]
    assert store.get("due-ok").expires_at == env.clock.now + timedelta(seconds=86399)
    assert store.get("due-down").refresh_failure_count == 1
    assert store.get("later").expires_at == env.clock.now + timedelta(seconds=700)  # untouched
    assert len(token_calls(rsps)) == 1 + 1 + 3  # ok, rejected, three attempts while down


def test_refresher_stops_taking_work_when_time_runs_low(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    for n in range(5):
        env.link(rsps, f"user-{n}", access=f"access-MARKER-{n}", refresh=f"refresh-MARKER-{n}")
        set_expiry(env, f"user-{n}", 100)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-r", "refresh-MARKER-r"))
    remaining = iter([60_000, 60_000, 5_000, 5_000, 5_000])
    manager = env.manager()
    summary = run_every_five_minutes(env, manager, concurrency=1, remaining_ms=lambda: next(remaining))
    assert (summary.scanned, summary.refreshed, summary.skipped) == (5, 2, 3)
    assert len(token_calls(rsps)) == 2


def test_key_rotation_reencrypts_rows_persists_ring_and_retires_old_keys(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    oldest = KeyRing.generate("k-oldest")
    env.ring = KeyRing("k-previous", {**oldest.keys, **KeyRing.generate("k-previous").keys})
    for n in range(3):
        env.link(rsps, f"user-{n}", access=f"access-MARKER-{n}", refresh=f"refresh-MARKER-{n}")
    persisted: list[KeyRing] = []
    manager = env.manager()
    result = run_key_rotation(manager._store, env.ring, persist_ring=persisted.append)
    new_ring = persisted[0]
    assert result["previousKeyId"] == "k-previous"
    assert result["activeKeyId"] == new_ring.active_key_id != "k-previous"
    assert (result["scanned"], result["reencrypted"], result["lostRaces"], result["failed"]) == (3, 3, 0, 0)
    assert result["retiredKeyIds"] == ["k-oldest"]
    assert set(persisted[-1].keys) == {"k-previous", new_ring.active_key_id}
    assert manager._store.count_by_key_id() == {new_ring.active_key_id: 3}
    rotated = env.manager(cipher=TokenCipher(persisted[-1]))
    assert rotated.get_token("user-1").access_token == "access-MARKER-1"


def test_key_rotation_persists_the_ring_before_touching_rows(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)

    def ssm_down(ring: KeyRing) -> None:
        raise RuntimeError("ssm unreachable")

    manager = env.manager()
    with pytest.raises(RuntimeError):
        run_key_rotation(manager._store, env.ring, persist_ring=ssm_down)
    assert manager._store.count_by_key_id() == {env.ring.active_key_id: 1}


def test_refresher_stops_after_sonos_refuses_our_client_and_keeps_every_grant(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    users = [f"due-{n}" for n in range(5)]
    for user in users:
        env.link(rsps, user, access=f"access-MARKER-{user}", refresh=f"refresh-MARKER-{user}")
        set_expiry(env, user, 60)
    rsps.add(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_client"})
    manager = env.manager()

    summary = run_every_five_minutes(env, manager, concurrency=1)

    # One refusal is enough to know: the rest would be refused the same way.
    assert summary.to_dict() == refresher_summary(scanned=5, failedConfiguration=1, skipped=4)
    assert len(token_calls(rsps)) == 1
    assert {manager._store.get(user).token_status for user in users} == {TokenStatus.ACTIVE}
    assert env.notifier.events == []
