"""Postgres stops mid-run: a cached token is still served, everything that needs the row
answers storage_unavailable without losing or changing it, and the service reconnects on
its own once Postgres is back."""

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

pytestmark = pytest.mark.integration

OTHER_USER = "user-whose-token-is-not-cached"


def test_fetch_serves_a_cached_token_and_a_miss_is_storage_unavailable_while_postgres_is_down(
    world: ServiceWorld, services: ServiceControl
) -> None:
    linked = world.link()
    other = world.link(OTHER_USER)
    assert world.fetch()["accessToken"] == linked.access_token  # cached
    world.flush_cache()
    assert world.fetch()["accessToken"] == linked.access_token  # cached again; OTHER_USER is not
    before = world.rows()

    with services.postgres_stopped():
        assert world.fetch()["accessToken"] == linked.access_token
        assert_direct_error(world.fetch(OTHER_USER), "storage_unavailable")
        assert_api_error(world.fetch_api(OTHER_USER), "storage_unavailable")

    assert_grant_unchanged(before, world.rows())
    # The same warm container reconnects by itself.
    assert world.fetch(OTHER_USER)["accessToken"] == other.access_token


def test_callback_while_postgres_is_down_spends_nothing_and_the_reload_links(
    world: ServiceWorld, services: ServiceControl
) -> None:
    # Decided behaviour: the callback checks the store before it consumes the state or
    # spends the code. While Postgres is down the browser gets storage_unavailable and the
    # state stays as it was, so reloading the page once Postgres is back completes the link
    # with the same, still unused, code. (Failing after the exchange would throw away
    # tokens Sonos had issued and leave the user to start again.)
    world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", "https://app.example.test/sonos/failed")
    world.new_container()
    world.fetch()  # the container is warm, its store connection open
    started = world.initiate()
    query = world.consent(started["authorizationUrl"])

    with services.postgres_stopped():
        down = world.callback(query)

    assert down["statusCode"] == 302
    assert header(down, "Location") == "https://app.example.test/sonos/failed?error=storage_unavailable"
    assert world.stand_in.counts()["token_code"] == 0
    reloaded = world.callback(query)
    assert reloaded["statusCode"] == 200, reloaded
    assert world.stand_in.counts()["token_code"] == 1
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    assert "accessToken" in world.fetch()


def test_revoke_while_postgres_is_down_changes_nothing_and_works_after(
    world: ServiceWorld, services: ServiceControl
) -> None:
    linked = world.link()
    world.fetch()
    before = world.rows()
    event = api_event("token_revoke_api.json", query={"userId": USER})

    with services.postgres_stopped():
        assert_api_error(world.invoke("token_revoke", event), "storage_unavailable")
        assert_direct_error(world.invoke("token_revoke", {"userId": USER}), "storage_unavailable")
        # The revoke changed nothing, so the cached token is still the user's, and served.
        assert world.fetch()["accessToken"] == linked.access_token

    assert_grant_unchanged(before, world.rows())
    answer = world.invoke("token_revoke", event)
    assert json.loads(answer["body"]) == {"revoked": True, "providerRevoked": False}
    assert_direct_error(world.fetch(), "not_connected")


def test_a_refresh_is_not_attempted_when_the_row_cannot_be_read(world: ServiceWorld, services: ServiceControl) -> None:
    world.link()
    world.expire_in(-1)
    before = world.rows()

    with services.postgres_stopped():
        assert_direct_error(world.fetch(), "storage_unavailable")
        summary = world.invoke("token_refresher", {"source": "aws.scheduler"})
        assert_direct_error(summary, "storage_unavailable")

    assert world.stand_in.counts()["token_refresh"] == 0
    assert_grant_unchanged(before, world.rows())
    assert "accessToken" in world.fetch()  # refreshed now
    assert world.stand_in.counts()["token_refresh"] == 1


def test_initiate_needs_no_postgres(world: ServiceWorld, services: ServiceControl) -> None:
    with services.postgres_stopped():
        answer = world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body={"userId": USER}))
    assert answer["statusCode"] == 200
    assert "authorizationUrl" in json.loads(answer["body"])
