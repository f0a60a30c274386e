"""The Sonos stand-in fails the way a cloud does: 500s, 429s with Retry-After, connection
resets, requests that hang, and answers that arrive after we gave up.

Each fault goes through a fetch whose token is due (so it refreshes) or a callback (so it
exchanges a code). Retried waits are recorded, never slept; a hang costs the real client
read timeout, set short with SONOS_HTTP_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support.answer_checks import refresher_summary
from tests.support.service_world import (
    USER,
    ServiceWorld,
    api_event,
    assert_api_error,
    assert_direct_error,
    assert_grant_unchanged,
)

pytestmark = pytest.mark.integration

BACKOFF_CAP_SECONDS = 2.0
SHORT_READ_TIMEOUT_SECONDS = 0.3

# fault knobs for one bad answer, and the same fault on every one of the three attempts
ONE_FAULT: dict[str, dict[str, Any]] = {
    "500": {"fail_next": 1, "fail_status": 500},
    "503": {"fail_next": 1, "fail_status": 503},
    "429": {"rate_limit_next": 1, "retry_after_seconds": 2},
    "reset": {"reset_next": 1},
    "hang": {"hang_next": 1},
}
EVERY_ATTEMPT: dict[str, dict[str, Any]] = {
    "500": {"fail_next": 3, "fail_status": 500},
    "429": {"rate_limit_next": 3, "retry_after_seconds": 2},
    "reset": {"reset_next": 3},
    "hang": {"hang_next": 3},
}


def _short_read_timeout(world: ServiceWorld) -> None:
    world.monkeypatch.setenv("SONOS_HTTP_TIMEOUT_SECONDS", str(SHORT_READ_TIMEOUT_SECONDS))
    world.new_container()


def _refreshes(world: ServiceWorld) -> int:
    return world.stand_in.counts()["token_refresh"]


@pytest.mark.parametrize("fault", sorted(ONE_FAULT))
def test_c1_one_failed_refresh_attempt_is_retried_and_the_caller_gets_a_new_token(
    world: ServiceWorld, fault: str
) -> None:
    _short_read_timeout(world)
    linked = world.link()
    world.expire_in(-1)  # expired: only a refreshed token will do
    world.stand_in.configure(**ONE_FAULT[fault])

    answer = world.fetch()

    assert answer["accessToken"] != linked.access_token
    assert _refreshes(world) == 2
    assert len(world.sleeps) == 1
    if fault == "429":
        assert world.sleeps == [2.0]  # Retry-After honoured
    else:
        assert 0 <= world.sleeps[0] <= BACKOFF_CAP_SECONDS
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    assert row["refresh_failure_count"] == 0
    assert world.tokens_of()[0] == answer["accessToken"]


@pytest.mark.parametrize("fault", sorted(EVERY_ATTEMPT))
def test_sonos_failing_every_attempt_is_upstream_unavailable_and_the_grant_survives(
    world: ServiceWorld, fault: str
) -> None:
    _short_read_timeout(world)
    world.link()
    world.expire_in(-1)
    before = world.rows()
    world.stand_in.configure(**EVERY_ATTEMPT[fault])

    started = time.monotonic()
    direct = world.fetch()
    elapsed = time.monotonic() - started

    assert_direct_error(direct, "upstream_unavailable")
    assert _refreshes(world) == 3  # three attempts, no more
    assert len(world.sleeps) == 2
    if fault == "429":
        assert world.sleeps == [2.0, 2.0]
    if fault == "hang":
        assert elapsed < 3 * SHORT_READ_TIMEOUT_SECONDS + 1.0  # the read timeout ended each attempt
    after = world.rows()
    assert_grant_unchanged(before, after)  # still active, same tokens: no reconnect for an outage
    assert after[USER]["refresh_failure_count"] == 1
    assert after[USER]["last_error_code"] == "upstream_unavailable"

    # The same over the API, then recovery once Sonos answers again.
    world.stand_in.configure(**EVERY_ATTEMPT[fault])
    assert_api_error(world.fetch_api(), "upstream_unavailable")
    recovered = world.fetch()
    assert recovered["accessToken"] == world.tokens_of()[0]
    assert world.row() is not None
    assert world.rows()[USER]["refresh_failure_count"] == 0


def test_a_still_valid_token_is_served_when_its_early_refresh_fails(world: ServiceWorld) -> None:
    linked = world.link()
    world.expire_in(120)  # inside the 300 s refresh-ahead window, still valid for two minutes
    before = world.rows()
    world.stand_in.configure(fail_next=3, fail_status=503)

    answer = world.fetch()

    assert answer["accessToken"] == linked.access_token
    assert _refreshes(world) == 3
    assert_grant_unchanged(before, world.rows())


def test_the_refresher_counts_an_outage_as_transient_and_keeps_the_grant(world: ServiceWorld) -> None:
    world.link()
    world.expire_in(60)
    before = world.rows()
    world.stand_in.configure(fail_next=3, fail_status=500)

    summary = world.invoke("token_refresher", {"source": "aws.scheduler"})

    assert summary == refresher_summary(scanned=1, failedTransient=1)
    assert_grant_unchanged(before, world.rows())


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_callback_while_sonos_does_not_answer_keeps_the_link_alive_and_a_reload_finishes_it(
    world: ServiceWorld, fault: str
) -> None:
    # Sonos fails the code exchange on every attempt, before it looks at the code: the
    # code is still good, so the state is put back and reloading the page links.
    _short_read_timeout(world)
    started = world.initiate()
    query = world.consent(started["authorizationUrl"])
    world.stand_in.configure(**EVERY_ATTEMPT[fault])

    page = world.callback(query)

    assert page["statusCode"] == 503
    assert "Reload this page in a moment to finish connecting." in page["body"]
    assert world.rows() == {}
    assert world.stand_in.counts()["token_code"] == 3
    # The faults are used up, as when Sonos recovers: the same callback URL finishes the link.
    again = world.callback(query)
    assert again["statusCode"] == 200
    assert "Sonos is connected" in again["body"]
    assert world.stand_in.counts()["token_code"] == 4
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    assert "accessToken" in world.fetch()
    # And the link is spent now: a third load answers like the success, with no exchange.
    assert world.callback(query)["statusCode"] == 200
    assert world.stand_in.counts()["token_code"] == 4


def test_callback_reloaded_after_sonos_spent_the_code_answers_expired_and_exchanges_once_more(
    world: ServiceWorld,
) -> None:
    # Our read timed out although Sonos took the code: the reload's exchange is refused
    # (invalid_grant) and the page says to start again; nothing is stored.
    _short_read_timeout(world)
    started = world.initiate()
    query = world.consent(started["authorizationUrl"])
    world.stand_in.configure(latency_seconds=SHORT_READ_TIMEOUT_SECONDS + 0.2)

    assert world.callback(query)["statusCode"] == 503
    world.stand_in.configure(latency_seconds=0.0)
    again = world.callback(query)

    assert again["statusCode"] == 400
    assert "This link has expired" in again["body"]
    assert world.stand_in.counts()["token_code"] == 4  # three timed out, one refused
    assert world.rows() == {}


def test_callback_for_an_account_without_households_says_so_and_revokes_the_new_grant(
    world: ServiceWorld,
) -> None:
    world.monkeypatch.setenv("SONOS_REVOKE_URL", world.stand_in.revoke_url)
    world.new_container()
    world.stand_in.configure(households=0)
    started = world.initiate()
    query = world.consent(started["authorizationUrl"])

    page = world.callback(query)

    assert page["statusCode"] == 404
    assert "No Sonos system found" in page["body"]
    assert world.rows() == {}
    counts = world.stand_in.counts()
    assert (counts["token_code"], counts["households"], counts["revoke"]) == (1, 1, 1)
    # A reload repeats the answer without another exchange.
    assert world.callback(query)["statusCode"] == 404
    assert world.stand_in.counts()["token_code"] == 1
    # Once the account has a household, a new flow links.
    world.stand_in.configure(households=1)
    linked = world.link()
    assert world.fetch()["accessToken"] == linked.access_token


def test_c6_a_refresh_answered_after_our_timeout_can_lose_a_rotated_refresh_token(world: ServiceWorld) -> None:
    # Sonos rotates the refresh token (the stand-in does), but its answer arrives after our
    # read timeout: the new refresh token is lost with the answer, and the old one is dead.
    # Nothing can recover that grant; the service must say so once (reconnect_required and
    # one event) instead of retrying forever. Keeping the grant active would only fail again.
    _short_read_timeout(world)
    world.link()
    world.expire_in(-1)
    world.stand_in.configure(latency_seconds=SHORT_READ_TIMEOUT_SECONDS + 0.2)

    slow = world.fetch()

    assert_direct_error(slow, "upstream_unavailable")  # three timeouts: transient, grant kept
    row = world.row()
    assert row is not None
    assert row["token_status"] == "active"
    world.stand_in.configure(latency_seconds=0.0)
    gone = world.fetch()
    assert_direct_error(gone, "reconnect_required")
    row = world.row()
    assert row is not None
    assert row["token_status"] == "expired"
    assert row["access_token_encrypted"] is None
    assert row["refresh_token_encrypted"] is None
    assert row["last_error_code"] == "invalid_request"


def test_a_slow_answer_without_rotation_costs_nothing_once_sonos_is_fast_again(world: ServiceWorld) -> None:
    world.stand_in.configure(rotate_refresh_tokens=False)
    _short_read_timeout(world)
    linked = world.link()
    world.expire_in(-1)
    world.stand_in.configure(latency_seconds=SHORT_READ_TIMEOUT_SECONDS + 0.2)
    assert_direct_error(world.fetch(), "upstream_unavailable")
    world.stand_in.configure(latency_seconds=0.0)

    answer = world.fetch()

    assert answer["accessToken"] != linked.access_token
    assert world.tokens_of()[1] == linked.refresh_token


def test_sonos_rejecting_our_client_is_configuration_error_and_keeps_the_grant_c12(world: ServiceWorld) -> None:
    world.link()
    world.expire_in(-1)
    before = world.rows()
    world.stand_in.configure(invalid_client=True)

    assert_direct_error(world.fetch(), "configuration_error")
    assert_api_error(world.fetch_api(), "configuration_error")

    assert_grant_unchanged(before, world.rows())
    assert _refreshes(world) == 2  # one request each, never retried
    world.stand_in.configure(invalid_client=False)
    assert "accessToken" in world.fetch()


def test_sonos_unreachable_fetch_is_upstream_unavailable_and_revoke_still_revokes(world: ServiceWorld) -> None:
    world.monkeypatch.setenv("SONOS_REVOKE_URL", world.stand_in.revoke_url)
    world.new_container()
    world.link()
    world.expire_in(-1)
    before = world.rows()
    world.stand_in.stop()  # connection refused from now on

    assert_direct_error(world.fetch(), "upstream_unavailable")
    assert_grant_unchanged(before, world.rows())
    answer = world.invoke("token_revoke", api_event("token_revoke_api.json", query={"userId": USER}))

    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"revoked": True, "providerRevoked": False}  # best effort only
    assert world.rows() == {}


def test_three_hung_sonos_attempts_end_inside_the_api_functions_timeout() -> None:
    # A hung Sonos must cost the caller upstream_unavailable, not a Lambda killed at its
    # timeout (API Gateway would answer 502/504 and the refresh lock would linger).
    from devtools.local_api import DEFAULT_TEMPLATE, load_template
    from token_manager.provider import SonosClientConfig

    template = load_template(DEFAULT_TEMPLATE)
    function_timeout = float(template["Globals"]["Function"]["Timeout"])
    read_timeout = float(template["Globals"]["Function"]["Environment"]["Variables"]["SONOS_HTTP_TIMEOUT_SECONDS"])
    client = SonosClientConfig(client_id="id", client_secret="secret", read_timeout=read_timeout)
    retries = range(client.max_attempts - 1)
    backoff_windows = sum(min(client.backoff_cap_seconds, client.backoff_base_seconds * 2**n) for n in retries)
    slow_attempts = client.max_attempts * (client.connect_timeout + client.read_timeout) + backoff_windows
    rate_limited = (client.max_attempts - 1) * client.retry_after_cap_seconds
    margin_for_redis_and_postgres = 2.0
    assert slow_attempts + margin_for_redis_and_postgres < function_timeout
    assert rate_limited + margin_for_redis_and_postgres < function_timeout


def test_a_bad_sonos_timeout_setting_is_configuration_error_naming_it(world: ServiceWorld) -> None:
    world.link()
    for bad in ("0", "-1", "nan", "soon", "61"):
        world.monkeypatch.setenv("SONOS_HTTP_TIMEOUT_SECONDS", bad)
        world.new_container()
        answer = world.fetch()
        assert_direct_error(answer, "configuration_error")
        assert "SONOS_HTTP_TIMEOUT_SECONDS" in answer["error"]["message"]
