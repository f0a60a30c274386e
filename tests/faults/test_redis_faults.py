"""Redis dies (or hangs) mid-run: fetch keeps answering from the store, initiate and callback
answer storage_unavailable, and everything works again once Redis is back."""

from __future__ import annotations

import json

import pytest

from tests.support.handlers import header
from tests.support.service_control import ServiceControl
from tests.support.service_world import (
    USER,
    ServiceWorld,
    api_event,
    assert_api_error,
    assert_direct_error,
    assert_grant_unchanged,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def test_fetch_answers_from_the_store_while_redis_is_dead(world: ServiceWorld, services: ServiceControl) -> None:
    linked = world.link()
    assert world.fetch()["accessToken"] == linked.access_token  # warm: the token is cached now
    before = world.rows()

    with services.redis_killed():
        direct = world.fetch()
        api = world.fetch_api()

    assert direct["accessToken"] == linked.access_token
    assert api["statusCode"] == 200, api
    assert json.loads(api["body"])["accessToken"] == linked.access_token
    assert world.stand_in.counts()["token_refresh"] == 0
    assert_grant_unchanged(before, world.rows())
    assert world.fetch()["accessToken"] == linked.access_token  # and after Redis is back


def test_a_due_refresh_still_happens_once_without_the_lock_while_redis_is_dead(
    world: ServiceWorld, services: ServiceControl
) -> None:
    linked = world.link()
    world.expire_in(60)  # inside the 300 s refresh-ahead window

    with services.redis_killed():
        answer = world.fetch()

    assert answer["accessToken"] != linked.access_token
    assert world.stand_in.counts()["token_refresh"] == 1
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    assert world.tokens_of()[0] == answer["accessToken"]  # the version-checked write landed
    assert world.fetch()["accessToken"] == answer["accessToken"]


def test_initiate_and_callback_answer_storage_unavailable_while_redis_is_dead_and_recover(
    world: ServiceWorld, services: ServiceControl
) -> None:
    started = world.initiate()
    callback_query = world.consent(started["authorizationUrl"])

    with services.redis_killed():
        assert_direct_error(world.initiate(), "storage_unavailable")
        assert_api_error(
            world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body={"userId": USER})),
            "storage_unavailable",
        )
        page = world.callback(callback_query)
        assert page["statusCode"] == 503
        assert "Sonos could not be connected" in page["body"]
        world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", "https://app.example.test/sonos/failed")
        world.new_container()
        redirected = world.callback(callback_query)
        assert redirected["statusCode"] == 302
        assert header(redirected, "Location") == "https://app.example.test/sonos/failed?error=storage_unavailable"

    # No code was exchanged and nothing was stored while the state could not be read.
    assert world.stand_in.counts()["token_code"] == 0
    assert world.rows() == {}
    # The restarted Redis is empty (no persistence): that state is gone, and says so.
    lost = world.callback(callback_query)
    assert lost["statusCode"] == 302
    assert header(lost, "Location") == "https://app.example.test/sonos/failed?error=invalid_state"
    assert world.stand_in.counts()["token_code"] == 0
    # A new flow in the same container links.
    world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", "")
    linked = world.link()
    assert world.fetch()["accessToken"] == linked.access_token


def test_a_hung_redis_costs_fetch_its_socket_timeout_not_the_answer(
    world: ServiceWorld, services: ServiceControl
) -> None:
    linked = world.link()
    world.fetch()
    before = world.rows()

    with services.redis_frozen():
        answer = world.fetch()
        assert_direct_error(world.initiate(), "storage_unavailable")

    assert answer["accessToken"] == linked.access_token
    assert_grant_unchanged(before, world.rows())


def test_revoke_during_a_redis_partition_changes_nothing_and_the_retry_revokes_for_good(
    world: ServiceWorld, services: ServiceControl
) -> None:
    # Across a partition (or an ElastiCache failover) Redis keeps its data. A revoke that
    # deleted the row and answered success without dropping the cached token would see
    # that token served again, to a user who disconnected Sonos, once Redis answers.
    with TcpProxy(services.handles.redis_port) as proxy:
        world.use_redis_at(proxy.port)
        linked = world.link()
        world.fetch()  # cached
        before = world.rows()

        with proxy.partitioned():
            during = world.invoke("token_revoke", {"userId": USER})

        assert_direct_error(during, "storage_unavailable")
        assert_grant_unchanged(before, world.rows())  # all or nothing: the grant is whole
        assert world.fetch()["accessToken"] == linked.access_token  # still connected, consistently
        assert world.invoke("token_revoke", {"userId": USER}) == {"revoked": True, "providerRevoked": False}
        assert world.rows() == {}
        assert_direct_error(world.fetch(), "not_connected")


def test_revoke_over_the_api_while_redis_is_dead_is_storage_unavailable_then_revokes(
    world: ServiceWorld, services: ServiceControl
) -> None:
    world.link()
    before = world.rows()
    event = api_event("token_revoke_api.json", query={"userId": USER})

    with services.redis_killed():
        assert_api_error(world.invoke("token_revoke", event), "storage_unavailable")

    assert_grant_unchanged(before, world.rows())
    answer = world.invoke("token_revoke", event)
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"revoked": True, "providerRevoked": False}
    assert world.rows() == {}
