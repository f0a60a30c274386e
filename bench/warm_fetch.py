"""Token fetch through the handler, in-process: a warm cache hit and a cache miss, each against its raw baseline.

The handler is ``functions/token_fetch/app.py`` invoked with the router's direct
payload, wired by ``runtime`` from environment settings that point at the live Redis
and Postgres. The baselines are one raw redis-py GET of the very same cache key and
the very same SELECT the store sent, over a psycopg connection with the store's
options. Every timed call, handler or baseline, follows the same idle pause and the
two alternate, so both see the same machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.report import Row
from bench.services import (
    BenchServices,
    command_deltas,
    counting_redis_round_trips,
    counting_sql_statements,
    fresh_grant,
    redis_command_calls,
    seed_grants,
    stdout_discarded,
)
from bench.stats import median, percentile

SECTION_HIT = "warm fetch (cache hit)"
SECTION_MISS = "fetch on a cache miss"
USER_ID = "bench-warm-user"
# An invocation arrives on its own, not straight after the last one: a back-to-back loop
# keeps the loopback round trip artificially hot on a VM (see docs/benchmarks.md).
PAUSE_SEC = 0.001
COUNTED_FETCHES = 200
HIT_RATIO_TARGET = 2.0
MISS_RATIO_TARGET = 2.0


@dataclass(frozen=True)
class PairedTimes:
    """Per-call durations (µs) of the subject and its baseline in one run."""

    subject: list[float]
    baseline: list[float]


def run(services: BenchServices, *, runs: int, calls: int) -> list[Row]:
    import psycopg
    import redis
    from psycopg.rows import dict_row

    from tests.support.handlers import LambdaContextStub, load_handler
    from token_manager import runtime
    from token_manager.cache import token_key

    seed_grants(services.database_url, services.key_ring_json, [fresh_grant(USER_ID)])
    raw_redis = redis.Redis.from_url(services.redis_url)
    raw_redis.delete(token_key(USER_ID))
    payload = {"userId": USER_ID}
    context = LambdaContextStub(function_name="sonos-token-fetch-bench")

    with services.handler_environment(), stdout_discarded():
        runtime.reset_for_tests()
        handler = load_handler("token_fetch")

        def fetch() -> None:
            answer = handler.lambda_handler(payload, context)
            if "accessToken" not in answer:
                raise RuntimeError(f"token fetch failed during the bench: {answer.get('error')}")

        fetch()  # the cold invocation: settings, connections, and the cache filled

        # What one warm fetch sends to Redis and to Postgres.
        before = redis_command_calls(raw_redis)
        with counting_sql_statements() as hit_sql:
            for _ in range(COUNTED_FETCHES):
                fetch()
        hit_commands = command_deltas(before, redis_command_calls(raw_redis))

        # ... and one fetch that misses the cache (the statement it sends is the SELECT baseline).
        before = redis_command_calls(raw_redis)
        with counting_sql_statements() as miss_sql, counting_redis_round_trips(ignoring=raw_redis) as miss_trips:
            for _ in range(COUNTED_FETCHES):
                raw_redis.delete(token_key(USER_ID))
                fetch()
        miss_commands = command_deltas(before, redis_command_calls(raw_redis))
        miss_commands["del"] = miss_commands.get("del", 0) - COUNTED_FETCHES  # the bench's own deletes
        if miss_sql.first is None:
            raise RuntimeError("a cache miss sent no statement to Postgres")
        select, select_params = miss_sql.first

        raw_db = psycopg.connect(services.database_url, autocommit=True, row_factory=dict_row, prepare_threshold=None)
        try:

            def raw_get() -> None:
                raw_redis.get(token_key(USER_ID))

            def raw_select() -> None:
                raw_db.execute(select, select_params).fetchone()

            def miss_setup() -> None:
                raw_redis.delete(token_key(USER_ID))

            fetch()  # the cache filled again for the hit runs
            hit_runs = [_paired(fetch, raw_get, calls) for _ in range(runs)]
            miss_runs = [_paired(fetch, raw_select, calls, before_subject=miss_setup) for _ in range(runs)]
        finally:
            raw_db.close()
            runtime.reset_for_tests()

    hit_p50 = median([percentile(r.subject, 0.5) for r in hit_runs])
    hit_p99 = median([percentile(r.subject, 0.99) for r in hit_runs])
    get_p50 = median([percentile(r.baseline, 0.5) for r in hit_runs])
    hit_ratio = median([percentile(r.subject, 0.5) / percentile(r.baseline, 0.5) for r in hit_runs])
    miss_p50 = median([percentile(r.subject, 0.5) for r in miss_runs])
    select_p50 = median([percentile(r.baseline, 0.5) for r in miss_runs])
    miss_ratio = median([percentile(r.subject, 0.5) / percentile(r.baseline, 0.5) for r in miss_runs])

    per_hit = sum(hit_commands.values()) / COUNTED_FETCHES
    return [
        Row(SECTION_HIT, "handler p50", hit_p50, "µs"),
        Row(SECTION_HIT, "handler p99", hit_p99, "µs"),
        Row(SECTION_HIT, "raw redis-py GET p50, same key", get_p50, "µs"),
        Row(SECTION_HIT, "handler p50 / raw GET p50", hit_ratio, "x", HIT_RATIO_TARGET, digits=2),
        Row(
            SECTION_HIT,
            "Redis commands per fetch",
            per_hit,
            target=1,
            comparison="==",
            digits=2,
            note=_commands_note(hit_commands, COUNTED_FETCHES) + "; INFO commandstats",
        ),
        Row(
            SECTION_HIT,
            "store queries per fetch",
            hit_sql.count / COUNTED_FETCHES,
            target=0,
            comparison="==",
            digits=2,
            note="psycopg statements counted",
        ),
        Row(SECTION_MISS, "handler p50", miss_p50, "µs"),
        Row(SECTION_MISS, "raw psycopg SELECT p50, same statement", select_p50, "µs"),
        Row(SECTION_MISS, "handler p50 / raw SELECT p50", miss_ratio, "x", MISS_RATIO_TARGET, digits=2),
        Row(
            SECTION_MISS,
            "Redis round trips per fetch",
            miss_trips.count / COUNTED_FETCHES,
            digits=2,
            note=f"{_commands_note({k.lower(): v for k, v in miss_trips.commands.items()}, COUNTED_FETCHES)}; "
            f"Redis ran {_commands_note(miss_commands, COUNTED_FETCHES)}",
        ),
        Row(SECTION_MISS, "store queries per fetch", miss_sql.count / COUNTED_FETCHES, digits=2),
    ]


def _paired(
    subject: Callable[[], None],
    baseline: Callable[[], None],
    calls: int,
    *,
    before_subject: Callable[[], Any] | None = None,
) -> PairedTimes:
    """``calls`` timed calls of each, alternating, each after the same idle pause."""
    clock, pause = time.perf_counter, time.sleep
    subject_us: list[float] = []
    baseline_us: list[float] = []
    for _ in range(calls):
        if before_subject is not None:
            before_subject()
        pause(PAUSE_SEC)
        started = clock()
        subject()
        subject_us.append((clock() - started) * 1e6)
        pause(PAUSE_SEC)
        started = clock()
        baseline()
        baseline_us.append((clock() - started) * 1e6)
    return PairedTimes(subject_us, baseline_us)


def _commands_note(deltas: dict[str, int], fetches: int) -> str:
    parts = [f"{name.upper()} {count / fetches:g}" for name, count in sorted(deltas.items()) if count]
    return ", ".join(parts) or "none"
