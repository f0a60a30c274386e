"""The store fails the write right after Sonos answered a refresh.

The caller gets storage_unavailable and the row keeps the old tokens, still active. When
Sonos did not rotate the refresh token nothing is lost: the next fetch refreshes again.
When it did, the new refresh token is the only live one, so the service keeps that
refresh's result (ciphertexts only) in Redis and the next refresh writes it instead of
sending Sonos the dead one. Only when Redis fails at the same moment is it lost: then the
next refresh is rejected and the grant ends in reconnect_required (one reconnect event),
which nothing in the service can undo.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.secret_guard import SecretGuard
from tests.support.service_control import ServiceControl
from tests.support.service_world import (
    ServiceWorld,
    assert_api_error,
    assert_direct_error,
    assert_grant_unchanged,
    service_world,
    standin_config,
)
from tests.support.tcp_proxy import TcpProxy
from token_manager.errors import StorageUnavailable
from token_manager.models import StoredGrant, TokenUpdate
from token_manager.store.base import TokenStore

pytestmark = pytest.mark.integration


class FailingWrites:
    """A store whose next ``update_tokens`` calls raise StorageUnavailable, as Postgres would."""

    def __init__(self, inner: TokenStore, failures: int) -> None:
        self._inner = inner
        self.failures_left = failures

    def update_tokens(self, user_id: str, expected_version: int, update: TokenUpdate) -> StoredGrant | None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise StorageUnavailable("Token storage (Postgres) failed to answer.")
        return self._inner.update_tokens(user_id, expected_version, update)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _fail_next_token_writes(world: ServiceWorld, failures: int = 1) -> None:
    import token_manager.store as store_module

    build = store_module.store_from_settings

    def failing_store(**settings: Any) -> Any:
        return FailingWrites(build(**settings), failures)

    world.monkeypatch.setattr(store_module, "store_from_settings", failing_store)
    world.new_container()


@pytest.fixture
def non_rotating_world(
    monkeypatch: pytest.MonkeyPatch, secret_guard: SecretGuard, database_url: str, redis_url: str
) -> Iterator[ServiceWorld]:
    yield from service_world(
        monkeypatch=monkeypatch,
        guard=secret_guard,
        database_url=database_url,
        redis_url=redis_url,
        config=standin_config(rotate_refresh_tokens=False),
    )


def test_a_failed_write_after_a_refresh_is_storage_unavailable_and_the_row_keeps_the_old_tokens(
    world: ServiceWorld,
) -> None:
    linked = world.link()
    world.expire_in(-1)
    before = world.rows()
    _fail_next_token_writes(world)

    assert_direct_error(world.fetch(), "storage_unavailable")

    assert world.stand_in.counts()["token_refresh"] == 1
    assert_grant_unchanged(before, world.rows())
    assert world.tokens_of() == (linked.access_token, linked.refresh_token)


def test_without_rotation_the_next_fetch_refreshes_again_and_nothing_is_lost(non_rotating_world: ServiceWorld) -> None:
    world = non_rotating_world
    linked = world.link()
    world.expire_in(-1)
    _fail_next_token_writes(world)
    assert_api_error(world.fetch_api(), "storage_unavailable")

    answer = world.fetch()

    assert answer["accessToken"] != linked.access_token
    assert world.tokens_of() == (answer["accessToken"], linked.refresh_token)
    assert world.stand_in.counts()["token_refresh"] == 2


def test_with_rotation_the_next_fetch_writes_the_kept_refresh_and_the_grant_lives(world: ServiceWorld) -> None:
    world.link()
    world.expire_in(-1)
    _fail_next_token_writes(world)
    assert_direct_error(world.fetch(), "storage_unavailable")

    answer = world.fetch()

    assert world.stand_in.counts()["token_refresh"] == 1  # written from Redis, Sonos not asked again
    access, _ = world.tokens_of()
    assert answer["accessToken"] == access
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    # The stored refresh token is the one Sonos rotated to: the next refresh works.
    world.expire_in(-1)
    again = world.fetch()
    assert again["accessToken"] != access
    assert world.stand_in.counts()["token_refresh"] == 2


def test_a_kept_refresh_from_an_older_row_is_dropped(world: ServiceWorld) -> None:
    world.link()
    world.expire_in(-1)
    _fail_next_token_writes(world)
    assert_direct_error(world.fetch(), "storage_unavailable")
    relinked = world.link()  # the user links again: the kept refresh belongs to the old grant
    world.expire_in(-1)

    answer = world.fetch()

    assert answer["accessToken"] != relinked.access_token
    assert world.stand_in.counts()["token_refresh"] == 2  # a real refresh from the new grant
    assert redis.Redis.from_url(world.redis_url).keys("sonos:refresh-unstored:*") == []


def test_with_rotation_and_redis_failing_too_the_lost_refresh_token_ends_the_grant(
    world: ServiceWorld, services: ServiceControl
) -> None:
    world.link()
    world.expire_in(-1)
    with TcpProxy(services.handles.redis_port) as proxy:
        world.use_redis_at(proxy.port)
        _fail_next_token_writes(world)
        with proxy.partitioned():
            assert_direct_error(world.fetch(), "storage_unavailable")  # no lock, no kept refresh

        answer = world.fetch()

    # Sonos rotated the refresh token on the first refresh; the stored one is dead.
    assert_direct_error(answer, "reconnect_required")
    row = world.row()
    assert row is not None
    assert row["token_status"] == "expired"
    assert row["access_token_encrypted"] is None
    assert row["refresh_token_encrypted"] is None
    assert world.stand_in.counts()["token_refresh"] == 2
