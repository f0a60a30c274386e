"""The scheduled refresher at 500, 1,000 and 2,000 due grants against a Sonos answering in 100 ms.

The grants are rows written straight into Postgres, encrypted with the service's key
ring, each holding a refresh token the stand-in issued through its own OAuth flow (so
every refresh is a real, accepted one). A scenario makes its first N rows due (expiring
inside the run's window, last refreshed a day ago) and leaves the rest a day from
expiry; the refresher handler then runs in-process, wired by ``runtime`` from the
environment (REFRESHER_CONCURRENCY 16, the default). The ideal is N x 100 ms / 16.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from bench.report import Row
from bench.services import BenchServices, SeededGrant, progress, seed_grants, stdout_discarded
from bench.stats import median

SECTION = "refresher (Sonos at 100 ms, concurrency 16)"
SIZES = (500, 1000, 2000)
STANDIN_LATENCY_SEC = 0.1
CONCURRENCY = 16
RATIO_TARGET = 1.5
USER_PREFIX = "bench-refresh-"
# Spread the due grants' expiry over the run's window (period 300 s + refresh-ahead 300 s).
DUE_EARLIEST_SEC, DUE_LATEST_SEC = 60, 540


def run(services: BenchServices, *, runs: int) -> list[Row]:
    import psycopg
    import redis

    from tests.support.handlers import LambdaContextStub, load_handler
    from token_manager import runtime

    largest = max(SIZES)
    progress(f"refresher: minting {largest} grants through the stand-in's OAuth flow")
    refresh_tokens = services.stand_in.mint_refresh_tokens(largest)
    now = datetime.now(UTC)
    user_ids = [f"{USER_PREFIX}{index:05d}" for index in range(largest)]
    with psycopg.connect(services.database_url, autocommit=True) as connection:
        connection.execute("truncate sonos_tokens")
    seed_grants(
        services.database_url,
        services.key_ring_json,
        [
            SeededGrant(user_id, f"access-{index:05d}".ljust(43, "x"), token, now + timedelta(days=1), now)
            for index, (user_id, token) in enumerate(zip(user_ids, refresh_tokens, strict=True))
        ],
    )
    raw_redis = redis.Redis.from_url(services.redis_url)
    walls: dict[int, list[float]] = {size: [] for size in SIZES}
    overrides = {"REFRESHER_CONCURRENCY": str(CONCURRENCY)}
    services.stand_in.configure(latency_seconds=STANDIN_LATENCY_SEC)
    try:
        with services.handler_environment(overrides), stdout_discarded():
            for _ in range(runs):
                for size in SIZES:
                    _make_due(services.database_url, user_ids, size)
                    raw_redis.flushdb()
                    runtime.reset_for_tests()  # a fresh container per run: connections opened inside the clock
                    handler = load_handler("token_refresher")
                    context = LambdaContextStub(function_name="sonos-token-refresher-bench", remaining_ms=900_000)
                    started = time.perf_counter()
                    summary = handler.lambda_handler({}, context)
                    walls[size].append(time.perf_counter() - started)
                    if summary.get("refreshed") != size:
                        raise RuntimeError(f"the refresher refreshed {summary} of {size} due grants")
            runtime.reset_for_tests()
    finally:
        services.stand_in.configure(latency_seconds=0.0)

    rows: list[Row] = []
    for size in SIZES:
        ideal = size * STANDIN_LATENCY_SEC / CONCURRENCY
        wall = median(walls[size])
        ratio = median([w / ideal for w in walls[size]])
        rows += [
            Row(SECTION, f"{size:,} due grants: wall time", wall, "s", digits=2, note=f"ideal {ideal:.2f} s"),
            Row(SECTION, f"{size:,} due grants: wall / (N x 100 ms / 16)", ratio, "x", RATIO_TARGET, digits=2),
        ]
    per_grant_ms = [median(walls[size]) / size * 1000 for size in SIZES]
    rows.append(
        Row(
            SECTION,
            "growth: ms per grant at 500 / 1,000 / 2,000",
            per_grant_ms[-1],
            "ms",
            digits=2,
            note=" / ".join(f"{value:.2f}" for value in per_grant_ms) + " (flat = linear)",
        )
    )
    return rows


def _make_due(database_url: str, user_ids: list[str], size: int) -> None:
    """The first ``size`` grants due in this run's window, the others a day from expiry."""
    import psycopg

    now = datetime.now(UTC)
    spread = DUE_LATEST_SEC - DUE_EARLIEST_SEC
    due = [
        (user_id, now + timedelta(seconds=DUE_EARLIEST_SEC + spread * index / size), now - timedelta(days=1))
        for index, user_id in enumerate(user_ids[:size])
    ]
    with psycopg.connect(database_url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute(
            "update sonos_tokens set expires_at = %s, last_refreshed_at = %s where user_id <> all(%s)",
            (now + timedelta(days=1), now, user_ids[:size]),
        )
        cursor.executemany(
            "update sonos_tokens set expires_at = %s, last_refreshed_at = %s where user_id = %s",
            [(expires_at, refreshed_at, user_id) for user_id, expires_at, refreshed_at in due],
        )
