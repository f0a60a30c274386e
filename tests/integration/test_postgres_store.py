"""What only the Postgres store has: its one shared connection, reconnecting, and a secret DSN."""

from __future__ import annotations

import socket
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from token_manager.errors import ConfigurationError, StorageUnavailable
from token_manager.models import NewGrant, TokenUpdate
from token_manager.store.postgres import PostgresTokenStore

pytestmark = pytest.mark.integration

PASSWORD = "pg-password-MARKER-2c7e91f0"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def grant(user_id: str) -> NewGrant:
    return NewGrant(
        user_id=user_id,
        household_id="Sonos_HH1",
        household_ids=("Sonos_HH1",),
        access_token_encrypted=f"ct-a-{user_id}",
        refresh_token_encrypted=f"ct-r-{user_id}",
        encryption_key_id="k1",
        expires_at=T0,
        scope="playback-control-all",
    )


def shown(error: BaseException) -> str:
    """Everything a log line or a stack trace of ``error`` would show, causes included."""
    return "".join(traceback.format_exception(error)) + repr(error)


def backend_pid(store: PostgresTokenStore) -> int:
    # Reaching into the store is the only way to aim at its connection from outside.
    connection = store._connection
    assert connection is not None
    return connection.info.backend_pid


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def store(migrated_database: str) -> Iterator[PostgresTokenStore]:
    made = PostgresTokenStore(migrated_database)
    yield made
    made.close()


def test_the_connection_opens_on_first_use_not_at_construction(migrated_database: str) -> None:
    store = PostgresTokenStore(migrated_database)
    assert store._connection is None
    assert store.get("u1") is None
    assert store._connection is not None
    store.close()


def test_a_connection_the_server_dropped_is_replaced_once_transparently(
    store: PostgresTokenStore, admin: psycopg.Connection[Any]
) -> None:
    store.link(grant("u1"))
    first_pid = backend_pid(store)
    admin.execute("select pg_terminate_backend(%s)", (first_pid,))

    stored = store.get("u1")

    assert stored is not None
    assert stored.user_id == "u1"
    assert backend_pid(store) != first_pid


def test_a_dropped_connection_that_cannot_be_replaced_is_storage_unavailable(
    store: PostgresTokenStore, migrated_database: str, admin: psycopg.Connection[Any]
) -> None:
    store.link(grant("u1"))
    name = migrated_database.rsplit("/", 1)[1]
    admin.execute(sql.SQL("alter database {} allow_connections false").format(sql.Identifier(name)))
    admin.execute("select pg_terminate_backend(%s)", (backend_pid(store),))

    with pytest.raises(StorageUnavailable):
        store.get("u1")


def test_close_then_use_opens_a_new_connection(store: PostgresTokenStore) -> None:
    store.link(grant("u1"))
    first_pid = backend_pid(store)
    store.close()
    assert store.get("u1") is not None
    assert backend_pid(store) != first_pid


def test_one_store_serves_a_thread_pool(store: PostgresTokenStore) -> None:
    users = [f"user-{n:02d}" for n in range(16)]

    def work(user_id: str) -> int:
        linked = store.link(grant(user_id))
        for step in range(5):
            update = TokenUpdate(f"ct-a-{step}", f"ct-r-{step}", "k1", T0 + timedelta(hours=step))
            refreshed = store.update_tokens(user_id, linked.version, update)
            assert refreshed is not None
            linked = refreshed
        return linked.version

    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = list(pool.map(work, users))

    assert len(set(versions)) == len(users)
    for user_id, version in zip(users, versions, strict=True):
        stored = store.get(user_id)
        assert stored is not None
        assert (stored.version, stored.access_token_encrypted) == (version, "ct-a-4")


def test_an_unreachable_server_is_storage_unavailable_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = PostgresTokenStore(f"postgresql://service:{PASSWORD}@127.0.0.1:{port}/postgres")

    with pytest.raises(StorageUnavailable) as caught:
        store.get("u1")

    assert PASSWORD not in shown(caught.value)
    assert PASSWORD not in repr(store)


def test_a_server_that_never_answers_times_out_as_storage_unavailable() -> None:
    # A socket that listens but never speaks: the kernel completes the handshake and
    # the startup packet goes unanswered, like a hung or black-holed database.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        store = PostgresTokenStore(f"postgresql://service:{PASSWORD}@127.0.0.1:{port}/postgres", connect_timeout=2)
        finished = threading.Event()
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                store.get("u1")
            except BaseException as exc:
                outcome.append(exc)
            finally:
                finished.set()

        threading.Thread(target=call, daemon=True).start()
        assert finished.wait(timeout=15), "connect_timeout was not honoured"

    assert len(outcome) == 1
    assert isinstance(outcome[0], StorageUnavailable)
    assert PASSWORD not in shown(outcome[0])


def test_a_malformed_dsn_is_a_configuration_error_that_does_not_quote_it() -> None:
    store = PostgresTokenStore(f"host=db.internal password={PASSWORD} not-a-setting")
    with pytest.raises(ConfigurationError, match="DATABASE_URL") as caught:
        store.get("u1")
    assert PASSWORD not in shown(caught.value)


def test_a_database_without_the_migration_is_a_configuration_error(fresh_database: str) -> None:
    store = PostgresTokenStore(fresh_database)
    with pytest.raises(ConfigurationError, match="42P01"):
        store.get("u1")
    store.close()
