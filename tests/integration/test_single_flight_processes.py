"""C2 across processes: 50 callers in 10 processes, one refresh reaches the Sonos stand-in."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from devtools.sonos_standin import SonosStandIn, StandInConfig
from tests.support.single_flight_worker import fetch_in_process
from token_manager.cache import RedisCache
from token_manager.crypto import KeyRing, TokenCipher
from token_manager.manager import SonosTokenManager
from token_manager.notifications import NullNotifier
from token_manager.provider import SonosClient, SonosClientConfig
from token_manager.store.postgres import PostgresTokenStore

pytestmark = pytest.mark.integration

PROCESSES = 10
THREADS_PER_PROCESS = 5
REDIRECT_URI = "http://127.0.0.1:9/sonos/oauth/callback"


def test_c2_fifty_callers_in_ten_processes_one_refresh(database_url: str, redis_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("truncate sonos_tokens")
    RedisCache.from_url(redis_url)._client.flushdb()
    ring = KeyRing.generate()
    with SonosStandIn(StandInConfig(rotate_refresh_tokens=True)) as standin:
        config = {
            "database_url": database_url,
            "redis_url": redis_url,
            "key_ring": ring.to_json(),
            "client_id": standin.config.client_id,
            "client_secret": standin.config.client_secret,
            "auth_base_url": standin.url,
            "control_base_url": standin.control_url,
            "redirect_uri": REDIRECT_URI,
            "user_id": "user-c2",
        }
        store = PostgresTokenStore(database_url)
        manager = SonosTokenManager(
            store=store,
            cache=RedisCache.from_url(redis_url),
            cipher=TokenCipher(ring),
            sonos=SonosClient(
                SonosClientConfig(
                    client_id=config["client_id"],
                    client_secret=config["client_secret"],
                    auth_base_url=standin.url,
                    control_base_url=standin.control_url,
                )
            ),
            notifier=NullNotifier(),
            redirect_uris=(REDIRECT_URI,),
        )
        flow = manager.initiate_oauth_flow("user-c2")
        callback = parse_qs(urlsplit(standin.approve(flow.authorization_url)).query)
        manager.handle_oauth_callback(callback["code"][0], callback["state"][0])
        # A day-old token 30 s before expiry, nothing cached: every caller must go for a refresh.
        now = datetime.now(UTC)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "update sonos_tokens set expires_at = %s, last_refreshed_at = %s where user_id = 'user-c2'",
                (now + timedelta(seconds=30), now - timedelta(seconds=86369)),
            )
        RedisCache.from_url(redis_url)._client.flushdb()
        standin.configure(latency_seconds=0.3)
        before = standin.counts()["token_refresh"]

        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(PROCESSES)
        results = ctx.Queue()
        processes = [
            ctx.Process(target=fetch_in_process, args=(config, start, THREADS_PER_PROCESS, results))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        answers = [results.get(timeout=60) for _ in range(PROCESSES * THREADS_PER_PROCESS)]
        for process in processes:
            process.join(timeout=30)
        refreshes = standin.counts()["token_refresh"] - before

    assert [a for a in answers if a[0] != "ok"] == []
    tokens = {a[1] for a in answers}
    assert refreshes == 1
    assert len(tokens) == 1
    stored = store.get("user-c2")
    assert stored is not None
    assert manager._to_access_token(stored).access_token in tokens
