"""A separate process of token fetch callers, as a Lambda container would be (test C2)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from token_manager.cache import RedisCache
    from token_manager.manager import SonosTokenManager
    from token_manager.store.postgres import PostgresTokenStore


def container_manager(
    config: dict[str, Any], *, use_lock: bool = True
) -> tuple[SonosTokenManager, PostgresTokenStore, RedisCache]:
    """One "container's" manager on the live Postgres and Redis, from a picklable ``config``
    (database_url, redis_url, key_ring, client_id, client_secret, auth_base_url,
    control_base_url, redirect_uri). Imports happen here, in the child process."""
    from token_manager.cache import RedisCache
    from token_manager.crypto import KeyRing, TokenCipher
    from token_manager.manager import SonosTokenManager
    from token_manager.notifications import NullNotifier
    from token_manager.provider import SonosClient, SonosClientConfig
    from token_manager.store.postgres import PostgresTokenStore

    store = PostgresTokenStore(config["database_url"])
    cache = RedisCache.from_url(config["redis_url"])
    manager = SonosTokenManager(
        store=store,
        cache=cache,
        cipher=TokenCipher(KeyRing.from_json(config["key_ring"])),
        sonos=SonosClient(
            SonosClientConfig(
                client_id=config["client_id"],
                client_secret=config["client_secret"],
                auth_base_url=config["auth_base_url"],
                control_base_url=config["control_base_url"],
            )
        ),
        notifier=NullNotifier(),
        redirect_uris=(config["redirect_uri"],),
        use_refresh_lock=use_lock,
    )
    return manager, store, cache


def fetch_in_process(config: dict[str, Any], start: Barrier, threads: int, results: Any, use_lock: bool = True) -> None:
    """Build one container's manager, wait for every process, then fetch from ``threads`` threads."""
    manager, _, _ = container_manager(config, use_lock=use_lock)
    inner = threading.Barrier(threads)

    def call() -> None:
        inner.wait()
        try:
            token = manager.get_token(config["user_id"])
            results.put(("ok", token.access_token, datetime.now(UTC).timestamp()))
        except Exception as exc:  # reported to the parent, which fails the test
            results.put(("error", type(exc).__name__, datetime.now(UTC).timestamp()))

    start.wait()
    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
