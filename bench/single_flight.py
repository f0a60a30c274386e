"""Single flight: 50 concurrent fetches of one grant at its refresh point, from 8 processes, stand-in at 300 ms.

Each process is one "container" with its own manager, connections and Sonos client,
built once and reused for every round; a round seeds the grant afresh (a day-old token
30 s before expiry, nothing cached) and releases every caller at once. Counted: the
token requests that reached the stand-in, and each caller's wait from its release to
its answer. The same load runs again with ``SonosTokenManager(use_refresh_lock=False)``.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier
from typing import Any

from bench.report import Row
from bench.services import REDIRECT_URI, BenchServices, SeededGrant, seed_grants
from bench.stats import median

SECTION = "single flight (50 callers, 8 processes)"
PROCESSES = 8
CALLERS = 50
STANDIN_LATENCY_SEC = 0.3
USER_ID = "bench-single-flight"
WAIT_TARGET_MS = 250.0
ROUND_TIMEOUT_SEC = 60.0


@dataclass(frozen=True)
class Round:
    token_requests: int
    slowest_wait_ms: float  # beyond the stand-in's latency
    failures: tuple[str, ...]  # the error each failed caller got


def run(services: BenchServices, *, runs: int) -> list[Row]:
    import redis

    from token_manager.cache import blocked_key, lock_key, token_key

    raw_redis = redis.Redis.from_url(services.redis_url)
    config = {
        "database_url": services.database_url,
        "redis_url": services.redis_url,
        "key_ring": services.key_ring_json,
        "client_id": services.stand_in.client_id,
        "client_secret": services.client_secret,
        "auth_base_url": services.stand_in.url,
        "control_base_url": services.stand_in.control_url,
        "redirect_uri": REDIRECT_URI,
        "user_id": USER_ID,
    }
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results: Any = context.Queue()
    commands = [context.Queue() for _ in range(PROCESSES)]
    workers = [
        context.Process(target=_worker, args=(config, commands[i], results, start), daemon=True)
        for i in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    threads = [CALLERS // PROCESSES + (1 if i < CALLERS % PROCESSES else 0) for i in range(PROCESSES)]
    rounds: dict[bool, list[Round]] = {True: [], False: []}
    try:
        for _ in range(PROCESSES):
            results.get(timeout=ROUND_TIMEOUT_SEC)  # every container built
        # Minted before the latency is set: the code exchange goes through the same token endpoint.
        refresh_tokens = iter(services.stand_in.mint_refresh_tokens(2 * runs, threads=2))
        services.stand_in.configure(latency_seconds=STANDIN_LATENCY_SEC)
        for _ in range(runs):
            for use_lock in (True, False):
                _seed_stale_grant(services, next(refresh_tokens))
                raw_redis.delete(token_key(USER_ID), lock_key(USER_ID), blocked_key(USER_ID))
                before = services.stand_in.counts()["token_refresh"]
                for queue, count in zip(commands, threads, strict=True):
                    queue.put((use_lock, count))
                answers: list[tuple[str, float]] = []
                for _ in range(PROCESSES):
                    answers += results.get(timeout=ROUND_TIMEOUT_SEC)
                rounds[use_lock].append(
                    Round(
                        token_requests=services.stand_in.counts()["token_refresh"] - before,
                        slowest_wait_ms=max(wait for _, wait in answers) * 1000 - STANDIN_LATENCY_SEC * 1000,
                        failures=tuple(status for status, _ in answers if status != "ok"),
                    )
                )
    finally:
        services.stand_in.configure(latency_seconds=0.0)
        for queue in commands:
            queue.put(None)
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()

    locked, unlocked = rounds[True], rounds[False]
    return [
        Row(
            SECTION,
            "token requests reaching Sonos, with the lock",
            median([r.token_requests for r in locked]),
            target=1,
            comparison="==",
            note=f"max over runs {max(r.token_requests for r in locked)}",
        ),
        Row(
            SECTION,
            "slowest caller's wait beyond Sonos' 300 ms, with the lock",
            median([r.slowest_wait_ms for r in locked]),
            "ms",
            WAIT_TARGET_MS,
            note=_failures_note(locked),
        ),
        Row(
            SECTION,
            "token requests reaching Sonos, lock off",
            median([r.token_requests for r in unlocked]),
        ),
        Row(
            SECTION,
            "slowest caller's wait beyond Sonos' 300 ms, lock off",
            median([r.slowest_wait_ms for r in unlocked]),
            "ms",
            note=_failures_note(unlocked),
        ),
    ]


def _failures_note(rounds: list[Round]) -> str:
    failures = [error for r in rounds for error in r.failures]
    note = f"{len(failures)} of {CALLERS * len(rounds)} callers failed over {len(rounds)} runs"
    if failures:
        spoiled = sum(1 for r in rounds if r.failures)
        kinds = ", ".join(sorted(set(failures)))
        note += f": {kinds}, in {spoiled} run{'s' if spoiled != 1 else ''}"
    return note


def _seed_stale_grant(services: BenchServices, refresh_token: str) -> None:
    """A day-old token 30 s before expiry (past its refresh point, still valid) with a refresh token Sonos issued."""
    now = datetime.now(UTC)
    seed_grants(
        services.database_url,
        services.key_ring_json,
        [
            SeededGrant(
                user_id=USER_ID,
                access_token="stale-" + refresh_token[:37],
                refresh_token=refresh_token,
                expires_at=now + timedelta(seconds=30),
                last_refreshed_at=now - timedelta(seconds=86369),
            )
        ],
    )


def _worker(config: dict[str, Any], commands: Any, results: Any, start: Barrier) -> None:
    """One container: a manager with the lock and one without, then rounds of concurrent fetches."""
    import logging

    # Without a handler, Python's last-resort one would print every expected refusal of the lock-off rounds.
    layer_logger = logging.getLogger("token_manager")
    layer_logger.addHandler(logging.NullHandler())
    layer_logger.propagate = False

    from tests.support.single_flight_worker import container_manager

    containers = {use_lock: container_manager(config, use_lock=use_lock) for use_lock in (True, False)}
    results.put(("ready", 0.0))
    while (command := commands.get()) is not None:
        use_lock, threads = command
        manager, store, cache = containers[use_lock]
        store.get(config["user_id"])  # connections open before the clock starts, as in a warm container
        cache.ping()
        results.put(_concurrent_fetches(manager, config["user_id"], threads, start))


def _concurrent_fetches(manager: Any, user_id: str, threads: int, start: Barrier) -> list[tuple[str, float]]:
    """Once every process is ready, ``threads`` callers fetch at once; each answer with its wait in seconds."""
    answers: list[tuple[str, float]] = []
    answers_lock = threading.Lock()
    release = threading.Barrier(threads)

    def call() -> None:
        release.wait()
        started = time.perf_counter()
        try:
            manager.get_token(user_id)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - counted as a failed caller
            status = type(exc).__name__
        with answers_lock:
            answers.append((status, time.perf_counter() - started))

    callers = [threading.Thread(target=call) for _ in range(threads)]
    start.wait()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    return answers
