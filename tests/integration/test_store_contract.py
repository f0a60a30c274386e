"""One contract for both grant stores, run on the same real Postgres rows and constraints.

The Postgres store talks to the test server directly; the Supabase store talks to a
PostgREST stand-in (tests/support/fake_postgrest.py) that runs its requests against the
same database as ``service_role``. Every test runs once per store.
"""

from __future__ import annotations

import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.fake_postgrest import FakePostgrest, raising
from token_manager.errors import StorageUnavailable
from token_manager.models import NewGrant, StoredGrant, TokenStatus, TokenUpdate
from token_manager.store import TokenStore
from token_manager.store.errors import StoreRejected
from token_manager.store.postgres import PostgresTokenStore
from token_manager.store.supabase import SupabaseTokenStore

pytestmark = pytest.mark.integration

SERVICE_ROLE_KEY = "service-role-MARKER-4f2a9c1e7b"
DB_PASSWORD = "db-password-MARKER-8e3d5a0c"
SUPABASE_URL = "https://project-ref.supabase.test"
# Far from UTC and not on the hour: a store that forgets to normalise shows it.
FAKE_POSTGREST_TIME_ZONE = "Pacific/Chatham"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def new_grant(user_id: str = "user-1", **overrides: Any) -> NewGrant:
    grant = NewGrant(
        user_id=user_id,
        household_id="Sonos_HH1",
        household_ids=("Sonos_HH1", "Sonos_HH2"),
        access_token_encrypted=f"ct-access-{user_id}",
        refresh_token_encrypted=f"ct-refresh-{user_id}",
        encryption_key_id="k1",
        expires_at=T0,
        scope="playback-control-all",
        last_refreshed_at=T0 - timedelta(hours=1),
    )
    return replace(grant, **overrides)


def token_update(**overrides: Any) -> TokenUpdate:
    update = TokenUpdate(
        access_token_encrypted="ct-access-new",
        refresh_token_encrypted="ct-refresh-new",
        encryption_key_id="k2",
        expires_at=T0 + timedelta(days=1),
        scope=None,
        last_refreshed_at=None,
    )
    return replace(update, **overrides)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Backend:
    """Makes stores of one kind over the test database."""

    kind: str
    database_url: str
    fake: FakePostgrest | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def new_store(self) -> TokenStore:
        if self.kind == "postgres":
            postgres = PostgresTokenStore(self.database_url)
            self._closers.append(postgres.close)
            return postgres
        assert self.fake is not None
        client = httpx.Client(transport=self.fake.transport())
        self._closers.append(client.close)
        return SupabaseTokenStore(SUPABASE_URL, SERVICE_ROLE_KEY, http_client=client)

    def unreachable_store(self) -> TokenStore:
        if self.kind == "postgres":
            return PostgresTokenStore(
                f"postgresql://service:{DB_PASSWORD}@127.0.0.1:{closed_port()}/postgres", connect_timeout=2
            )
        client = httpx.Client(
            transport=raising(lambda request: httpx.ConnectError("connection refused", request=request))
        )
        self._closers.append(client.close)
        return SupabaseTokenStore(SUPABASE_URL, SERVICE_ROLE_KEY, http_client=client)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        if self.fake is not None:
            self.fake.close()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An admin connection to the test database, with ``sonos_tokens`` emptied first."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as connection:
        connection.execute("truncate sonos_tokens")
        yield connection


BACKEND = pytest.StashKey[Backend]()


@pytest.fixture(params=["postgres", "supabase"])
def store(
    request: pytest.FixtureRequest, database_url: str, db: psycopg.Connection[dict[str, Any]]
) -> Iterator[TokenStore]:
    fake = FakePostgrest(database_url, SERVICE_ROLE_KEY, time_zone=FAKE_POSTGREST_TIME_ZONE)
    backend = Backend(request.param, database_url, fake if request.param == "supabase" else None)
    if backend.fake is None:
        fake.close()
    request.node.stash[BACKEND] = backend
    try:
        yield backend.new_store()
    finally:
        backend.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest, store: TokenStore) -> Backend:
    return request.node.stash[BACKEND]


def raw_row(db: psycopg.Connection[dict[str, Any]], user_id: str) -> dict[str, Any] | None:
    return db.execute("select * from sonos_tokens where user_id = %s", (user_id,)).fetchone()


def linked(store: TokenStore, user_id: str = "user-1", **overrides: Any) -> StoredGrant:
    return store.link(new_grant(user_id, **overrides))


# --- get and link -----------------------------------------------------------------


def test_get_returns_none_for_a_user_without_a_grant(store: TokenStore) -> None:
    assert store.get("nobody") is None


def test_link_stores_an_active_grant_and_get_reads_back_every_field(
    store: TokenStore, db: psycopg.Connection[dict[str, Any]]
) -> None:
    grant = new_grant()
    stored = store.link(grant)

    assert stored.user_id == "user-1"
    assert stored.household_id == "Sonos_HH1"
    assert stored.household_ids == ("Sonos_HH1", "Sonos_HH2")
    assert stored.access_token_encrypted == "ct-access-user-1"
    assert stored.refresh_token_encrypted == "ct-refresh-user-1"
    assert stored.encryption_key_id == "k1"
    assert stored.expires_at == T0
    assert stored.scope == "playback-control-all"
    assert stored.token_status is TokenStatus.ACTIVE
    assert stored.refresh_failure_count == 0
    assert stored.last_error_code is None
    assert stored.last_refreshed_at == T0 - timedelta(hours=1)
    for moment in (stored.expires_at, stored.last_refreshed_at, stored.created_at, stored.updated_at):
        assert moment is not None
        assert moment.tzinfo is UTC
    row = raw_row(db, "user-1")
    assert row is not None
    assert stored.version == row["version"]
    assert store.get("user-1") == stored


def test_link_accepts_expiry_given_in_another_time_zone_and_reads_it_back_in_utc(store: TokenStore) -> None:
    two_pm_in_berlin = datetime(2030, 6, 1, 14, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    stored = linked(store, expires_at=two_pm_in_berlin)
    assert stored.expires_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    assert stored.expires_at is not None
    assert stored.expires_at.tzinfo is UTC


def test_link_replacing_an_old_grant_resets_its_state_and_gets_a_higher_version(store: TokenStore) -> None:
    first = linked(store)
    assert store.record_refresh_failure("user-1", first.version, "upstream_unavailable")
    failed = store.get("user-1")
    assert failed is not None
    assert store.mark_expired("user-1", "invalid_grant", failed.version)

    second = store.link(
        new_grant(
            access_token_encrypted="ct-access-relinked",
            refresh_token_encrypted="ct-refresh-relinked",
            household_id="Sonos_HH9",
            household_ids=("Sonos_HH9",),
            last_refreshed_at=None,
        )
    )

    assert second.version > failed.version > first.version
    assert second.token_status is TokenStatus.ACTIVE
    assert second.refresh_failure_count == 0
    assert second.last_error_code is None
    assert second.last_refreshed_at is None
    assert second.access_token_encrypted == "ct-access-relinked"
    assert second.household_ids == ("Sonos_HH9",)
    assert second.created_at == first.created_at
    assert store.get("user-1") == second


def test_link_after_delete_gets_a_version_never_seen_before(store: TokenStore) -> None:
    first = linked(store)
    assert store.delete("user-1")
    second = linked(store)
    assert second.version > first.version
    # The writer that read the deleted grant cannot touch the new one.
    assert store.update_tokens("user-1", first.version, token_update()) is None
    assert store.get("user-1") == second


# --- update_tokens --------------------------------------------------------------


def test_update_tokens_with_the_read_version_writes_and_bumps_the_version(store: TokenStore) -> None:
    before = linked(store)
    assert store.record_refresh_failure("user-1", before.version, "upstream_unavailable")
    failed = store.get("user-1")
    assert failed is not None

    after = store.update_tokens("user-1", failed.version, token_update(last_refreshed_at=T0))

    assert after is not None
    assert after.version > failed.version
    assert after.access_token_encrypted == "ct-access-new"
    assert after.refresh_token_encrypted == "ct-refresh-new"
    assert after.encryption_key_id == "k2"
    assert after.expires_at == T0 + timedelta(days=1)
    assert after.last_refreshed_at == T0
    assert after.refresh_failure_count == 0
    assert after.last_error_code is None
    assert after.token_status is TokenStatus.ACTIVE
    assert store.get("user-1") == after


def test_update_tokens_without_scope_or_refresh_time_keeps_the_stored_ones(store: TokenStore) -> None:
    before = linked(store)
    after = store.update_tokens("user-1", before.version, token_update(scope=None, last_refreshed_at=None))
    assert after is not None
    assert after.scope == "playback-control-all"
    assert after.last_refreshed_at == before.last_refreshed_at

    rescoped = store.update_tokens("user-1", after.version, token_update(scope="playback-control-all extra"))
    assert rescoped is not None
    assert rescoped.scope == "playback-control-all extra"


def test_update_tokens_with_a_stale_version_writes_nothing(store: TokenStore) -> None:
    before = linked(store)
    assert store.update_tokens("user-1", before.version - 1, token_update()) is None
    assert store.update_tokens("user-1", before.version + 1000, token_update()) is None
    assert store.get("user-1") == before


def test_two_updates_with_the_same_expected_version_exactly_one_wins(store: TokenStore) -> None:
    before = linked(store)
    winner = store.update_tokens("user-1", before.version, token_update(access_token_encrypted="ct-first"))
    loser = store.update_tokens("user-1", before.version, token_update(access_token_encrypted="ct-second"))

    assert winner is not None
    assert loser is None
    assert store.get("user-1") == winner
    assert winner.access_token_encrypted == "ct-first"


def test_concurrent_updates_from_two_stores_with_the_same_version_exactly_one_wins(
    store: TokenStore, backend: Backend
) -> None:
    before = linked(store)
    contenders = [store, backend.new_store()]
    start = threading.Barrier(len(contenders))
    results: list[StoredGrant | None] = [None] * len(contenders)

    def contend(index: int) -> None:
        start.wait(timeout=10)
        update = token_update(access_token_encrypted=f"ct-contender-{index}")
        results[index] = contenders[index].update_tokens("user-1", before.version, update)

    threads = [threading.Thread(target=contend, args=(index,)) for index in range(len(contenders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert store.get("user-1") == winners[0]


def test_c10_update_after_delete_writes_nothing_and_does_not_resurrect_the_grant(
    store: TokenStore, db: psycopg.Connection[dict[str, Any]]
) -> None:
    before = linked(store)
    assert store.delete("user-1")

    assert store.update_tokens("user-1", before.version, token_update()) is None
    assert store.get("user-1") is None
    assert raw_row(db, "user-1") is None


def test_update_on_an_expired_grant_writes_nothing_even_with_its_current_version(store: TokenStore) -> None:
    before = linked(store)
    assert store.mark_expired("user-1", "invalid_grant", before.version)
    expired = store.get("user-1")
    assert expired is not None

    assert store.update_tokens("user-1", expired.version, token_update()) is None
    assert store.get("user-1") == expired
    assert expired.token_status is TokenStatus.EXPIRED
    assert expired.access_token_encrypted is None


# --- record_refresh_failure ------------------------------------------------------


def test_record_refresh_failure_counts_each_failure_and_keeps_the_grant_active(store: TokenStore) -> None:
    grant = linked(store)
    assert store.record_refresh_failure("user-1", grant.version, "upstream_unavailable")
    once = store.get("user-1")
    assert once is not None
    assert store.record_refresh_failure("user-1", once.version, "rate_limited")
    twice = store.get("user-1")
    assert twice is not None

    assert once.refresh_failure_count == 1
    assert twice.refresh_failure_count == 2
    assert twice.last_error_code == "rate_limited"
    assert twice.token_status is TokenStatus.ACTIVE
    assert twice.access_token_encrypted == grant.access_token_encrypted
    assert grant.version < once.version < twice.version


def test_record_refresh_failure_with_a_stale_version_changes_nothing(store: TokenStore) -> None:
    grant = linked(store)
    assert store.record_refresh_failure("user-1", grant.version, "upstream_unavailable")
    counted = store.get("user-1")

    assert not store.record_refresh_failure("user-1", grant.version, "upstream_unavailable")
    assert not store.record_refresh_failure("nobody", grant.version, "upstream_unavailable")
    assert store.get("user-1") == counted


# --- mark_expired ----------------------------------------------------------------


def test_mark_expired_clears_both_tokens_and_records_the_reason(store: TokenStore) -> None:
    grant = linked(store)
    assert store.mark_expired("user-1", "invalid_grant")
    expired = store.get("user-1")

    assert expired is not None
    assert expired.token_status is TokenStatus.EXPIRED
    assert expired.access_token_encrypted is None
    assert expired.refresh_token_encrypted is None
    assert expired.last_error_code == "invalid_grant"
    assert expired.version > grant.version
    assert expired.household_ids == grant.household_ids


def test_mark_expired_changes_only_an_active_grant(store: TokenStore) -> None:
    linked(store)
    assert store.mark_expired("user-1", "invalid_grant")
    expired = store.get("user-1")
    assert expired is not None

    assert not store.mark_expired("user-1", "invalid_request")
    assert not store.mark_expired("user-1", "invalid_request", expired.version)
    assert not store.mark_expired("nobody", "invalid_grant")
    assert store.get("user-1") == expired


def test_mark_expired_with_a_stale_version_changes_nothing(store: TokenStore) -> None:
    grant = linked(store)
    refreshed = store.update_tokens("user-1", grant.version, token_update())
    assert refreshed is not None

    assert not store.mark_expired("user-1", "invalid_grant", grant.version)
    assert store.get("user-1") == refreshed
    assert store.mark_expired("user-1", "invalid_grant", refreshed.version)


# --- reencrypt and delete -------------------------------------------------------


def test_reencrypt_replaces_ciphertexts_and_key_id_when_the_version_matches(store: TokenStore) -> None:
    grant = linked(store)
    assert store.reencrypt("user-1", grant.version, "ct-access-k2", "ct-refresh-k2", "k2")
    after = store.get("user-1")

    assert after is not None
    assert (after.access_token_encrypted, after.refresh_token_encrypted, after.encryption_key_id) == (
        "ct-access-k2",
        "ct-refresh-k2",
        "k2",
    )
    assert after.version > grant.version
    assert after.expires_at == grant.expires_at
    assert not store.reencrypt("user-1", grant.version, "ct-late", "ct-late", "k3")
    assert store.get("user-1") == after


def test_reencrypt_moves_an_expired_grant_to_the_new_key(store: TokenStore) -> None:
    linked(store)
    assert store.mark_expired("user-1", "invalid_grant")
    expired = store.get("user-1")
    assert expired is not None

    assert store.reencrypt("user-1", expired.version, None, None, "k2")
    after = store.get("user-1")
    assert after is not None
    assert after.encryption_key_id == "k2"
    assert after.token_status is TokenStatus.EXPIRED


def test_delete_removes_the_grant_once(store: TokenStore) -> None:
    linked(store)
    assert store.delete("user-1")
    assert not store.delete("user-1")
    assert store.get("user-1") is None


# --- scans ------------------------------------------------------------------------


def test_list_due_returns_only_active_grants_expiring_before_the_cutoff_in_user_id_order(store: TokenStore) -> None:
    cutoff = T0
    linked(store, "u-c", expires_at=cutoff - timedelta(seconds=1))
    linked(store, "u-a", expires_at=cutoff - timedelta(days=3))
    linked(store, "u-at-cutoff", expires_at=cutoff)
    linked(store, "u-later", expires_at=cutoff + timedelta(minutes=1))
    linked(store, "u-b-expired", expires_at=cutoff - timedelta(hours=1))
    assert store.mark_expired("u-b-expired", "invalid_grant")

    due = store.list_due(cutoff, limit=10)

    assert [grant.user_id for grant in due] == ["u-a", "u-c"]
    assert all(grant.token_status is TokenStatus.ACTIVE for grant in due)


def test_list_due_pages_by_user_id_without_gaps_or_repeats(store: TokenStore) -> None:
    users = [f"user-{n:02d}" for n in range(7)]
    for user_id in reversed(users):
        linked(store, user_id, expires_at=T0 - timedelta(minutes=1))
    linked(store, "user-99-not-due", expires_at=T0 + timedelta(days=1))

    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = [grant.user_id for grant in store.list_due(T0, limit=3, after_user_id=after)]
        if not page:
            break
        pages.append(page)
        after = page[-1]

    assert pages == [users[0:3], users[3:6], users[6:7]]


def test_list_not_under_key_pages_over_rows_under_other_keys(store: TokenStore) -> None:
    for user_id, key_id in [("a", "k1"), ("b", "k2"), ("c", "k0"), ("d", "k1"), ("e", "k2"), ("f", "k1")]:
        linked(store, user_id, encryption_key_id=key_id)
    assert store.mark_expired("f", "invalid_grant")

    first = store.list_not_under_key("k2", limit=2)
    second = store.list_not_under_key("k2", limit=2, after_user_id=first[-1].user_id)
    third = store.list_not_under_key("k2", limit=2, after_user_id=second[-1].user_id)

    assert [grant.user_id for grant in first] == ["a", "c"]
    assert [grant.user_id for grant in second] == ["d", "f"]
    assert third == []
    assert {grant.encryption_key_id for grant in [*first, *second]} == {"k0", "k1"}


def test_count_by_key_id_counts_every_row_whatever_its_status(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages, so the Supabase store's client-side count crosses page boundaries.
    monkeypatch.setattr("token_manager.store.supabase.COUNT_PAGE_SIZE", 2)
    assert store.count_by_key_id() == {}
    for user_id, key_id in [("a", "k1"), ("b", "k2"), ("c", "k1"), ("d", "k1"), ("e", "k3")]:
        linked(store, user_id, encryption_key_id=key_id)
    assert store.mark_expired("c", "invalid_grant")

    assert store.count_by_key_id() == {"k1": 3, "k2": 1, "k3": 1}


# --- refused input and failures --------------------------------------------------


def test_a_check_violation_on_link_surfaces_as_store_rejected_naming_the_constraint(store: TokenStore) -> None:
    with pytest.raises(StoreRejected) as caught:
        linked(store, household_id="Sonos_OTHER", access_token_encrypted="ct-MARKER-in-failing-row")

    assert caught.value.error_code == "23514"
    assert caught.value.constraint == "sonos_tokens_household_ids_contain_primary"
    assert "23514" in str(caught.value)
    # Postgres's detail ("Failing row contains ...") echoes row values: never passed on.
    assert "ct-MARKER" not in str(caught.value)
    assert store.get("user-1") is None


def test_a_blank_user_id_is_rejected(store: TokenStore) -> None:
    with pytest.raises(StoreRejected) as caught:
        linked(store, "   ")
    assert caught.value.constraint == "sonos_tokens_user_id_not_blank"


def test_reencrypt_that_would_leave_an_active_grant_without_tokens_is_rejected(store: TokenStore) -> None:
    grant = linked(store)
    with pytest.raises(StoreRejected) as caught:
        store.reencrypt("user-1", grant.version, None, None, "k2")
    assert caught.value.error_code == "23514"
    assert caught.value.constraint == "sonos_tokens_active_has_tokens"
    assert store.get("user-1") == grant


def test_naive_datetimes_are_refused_before_anything_is_sent(store: TokenStore) -> None:
    naive = datetime(2030, 1, 1, 12, 0)  # a naive datetime is the point of the test
    with pytest.raises(ValueError, match="timezone-aware"):
        linked(store, expires_at=naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.list_due(naive, limit=10)
    assert store.get("user-1") is None


def test_a_page_limit_below_one_is_refused(store: TokenStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.list_due(T0, limit=0)
    with pytest.raises(ValueError, match="limit"):
        store.list_not_under_key("k1", limit=0)


def test_backing_service_down_raises_storage_unavailable_without_secrets(backend: Backend) -> None:
    down = backend.unreachable_store()
    calls: list[Callable[[], object]] = [
        lambda: down.get("user-1"),
        lambda: down.link(new_grant()),
        lambda: down.update_tokens("user-1", 1, token_update()),
        lambda: down.record_refresh_failure("user-1", 1, "upstream_unavailable"),
        lambda: down.mark_expired("user-1", "invalid_grant", 1),
        lambda: down.reencrypt("user-1", 1, "a", "r", "k2"),
        lambda: down.delete("user-1"),
        lambda: down.list_due(T0, limit=10),
        lambda: down.list_not_under_key("k1", limit=10),
        down.count_by_key_id,
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            call()
        shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value) + repr(down)
        assert caught.value.retryable
        for secret in (SERVICE_ROLE_KEY, DB_PASSWORD):
            assert secret not in shown
