"""The local Sonos stand-in (devtools/sonos_standin.py), driven over real loopback sockets with `requests`."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from devtools.sonos_standin import CLIENT_SECRET_ENV, ConsentPageError, SonosStandIn, StandInConfig, _parse_args

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "standin-client"
CLIENT_SECRET = "standin-secret"
CLIENT_AUTH = (CLIENT_ID, CLIENT_SECRET)
REDIRECT_URI = "http://localhost:3000/sonos/oauth/callback"
HTTP_TIMEOUT_SEC = 10.0


class FakeClock:
    """Stands in for time.monotonic so code and token expiry are tested without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_sonos(clock: FakeClock) -> Iterator[Callable[..., SonosStandIn]]:
    started: list[SonosStandIn] = []

    def make(**knobs: Any) -> SonosStandIn:
        stand_in = SonosStandIn(StandInConfig(**knobs), clock=clock).start()
        started.append(stand_in)
        return stand_in

    yield make
    for stand_in in started:
        stand_in.stop()


@pytest.fixture
def sonos(make_sonos: Callable[..., SonosStandIn]) -> SonosStandIn:
    return make_sonos()


def authorize_url(sonos: SonosStandIn, **overrides: str) -> str:
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "state": "state-1",
        "scope": "playback-control-all",
        "redirect_uri": REDIRECT_URI,
        **overrides,
    }
    return f"{sonos.url}/login/v3/oauth?{urlencode(params)}"


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def token_request(
    sonos: SonosStandIn, data: dict[str, str], auth: tuple[str, str] | None = CLIENT_AUTH, **kwargs: Any
) -> requests.Response:
    timeout = kwargs.pop("timeout", HTTP_TIMEOUT_SEC)
    return requests.post(f"{sonos.url}/login/v3/oauth/access", data=data, auth=auth, timeout=timeout, **kwargs)


def exchange(sonos: SonosStandIn, code: str, redirect_uri: str = REDIRECT_URI) -> requests.Response:
    return token_request(sonos, {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})


def refresh(sonos: SonosStandIn, refresh_token: str, **kwargs: Any) -> requests.Response:
    return token_request(sonos, {"grant_type": "refresh_token", "refresh_token": refresh_token}, **kwargs)


def households(sonos: SonosStandIn, access_token: str) -> requests.Response:
    return requests.get(
        f"{sonos.control_url}/households",
        headers={"Authorization": f"Bearer {access_token}"},
        timeout=HTTP_TIMEOUT_SEC,
    )


def link(sonos: SonosStandIn, *, account: str | None = None) -> dict[str, Any]:
    """Consent, then exchange the code: the token response of a freshly linked account."""
    callback = sonos.approve(authorize_url(sonos), account=account)
    response = exchange(sonos, query_of(callback)["code"])
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- consent page ---------------------------------------------------------------------------------


def test_consent_page_asks_for_the_app_and_offers_allow_and_deny_buttons(sonos: SonosStandIn) -> None:
    response = requests.get(authorize_url(sonos), timeout=HTTP_TIMEOUT_SEC)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = response.text
    assert "Allow Storytailor to control your Sonos system?" in page
    assert 'id="allow"' in page
    assert 'id="deny"' in page
    assert 'action="/login/v3/oauth/decision"' in page
    assert f'name="redirect_uri" value="{REDIRECT_URI}"' in page


def test_consent_page_escapes_the_request_parameters(sonos: SonosStandIn) -> None:
    page = requests.get(authorize_url(sonos, state='"><script>x</script>'), timeout=HTTP_TIMEOUT_SEC).text

    assert "<script>x</script>" not in page
    assert "&lt;script&gt;" in page


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"client_id": "someone-else"}, "Unknown client_id"),
        ({"response_type": "token"}, "response_type must be code"),
        ({"redirect_uri": "ftp://example.test/cb"}, "redirect_uri"),
        ({"redirect_uri": "https://example.test/cb#frag"}, "redirect_uri"),
    ],
)
def test_consent_page_refuses_a_bad_authorize_request_with_400(
    sonos: SonosStandIn, override: dict[str, str], reason: str
) -> None:
    response = requests.get(authorize_url(sonos, **override), timeout=HTTP_TIMEOUT_SEC)

    assert response.status_code == 400
    assert reason in response.text
    assert 'id="allow"' not in response.text


def test_consent_page_refuses_a_redirect_uri_missing_from_the_registered_list(
    make_sonos: Callable[..., SonosStandIn],
) -> None:
    sonos = make_sonos(redirect_uris=("https://example.test/sonos/callback/",))

    refused = requests.get(authorize_url(sonos, redirect_uri="https://evil.test/cb"), timeout=HTTP_TIMEOUT_SEC)
    accepted = requests.get(
        authorize_url(sonos, redirect_uri="https://example.test/sonos/callback/"), timeout=HTTP_TIMEOUT_SEC
    )

    assert refused.status_code == 400
    assert accepted.status_code == 200


def test_approve_raises_with_the_reason_when_the_consent_page_refuses(sonos: SonosStandIn) -> None:
    with pytest.raises(ConsentPageError, match="400: Unknown client_id"):
        sonos.approve(authorize_url(sonos, client_id="someone-else"))


def test_allow_redirects_with_code_and_state_without_following(sonos: SonosStandIn) -> None:
    callback = sonos.approve(authorize_url(sonos, state="a b&c=d"))

    assert callback.startswith(REDIRECT_URI + "?")
    params = query_of(callback)
    assert params["state"] == "a b&c=d"
    assert params["code"]
    assert sonos.counts()["authorize"] == 1
    assert sonos.counts()["decision"] == 1
    assert sonos.counts()["token_code"] == 0


def test_allow_appends_code_to_a_redirect_uri_that_already_has_a_query(sonos: SonosStandIn) -> None:
    redirect_uri = "http://localhost:3000/cb?tenant=7"

    callback = sonos.approve(authorize_url(sonos, redirect_uri=redirect_uri))

    assert callback.startswith("http://localhost:3000/cb?tenant=7&code=")
    assert query_of(callback)["tenant"] == "7"
    assert exchange(sonos, query_of(callback)["code"], redirect_uri).status_code == 200


def test_deny_redirects_with_access_denied_and_the_state(sonos: SonosStandIn) -> None:
    callback = sonos.deny(authorize_url(sonos, state="state-9"))

    assert callback == f"{REDIRECT_URI}?error=access_denied&state=state-9"


def test_decision_with_tampered_client_id_is_refused(sonos: SonosStandIn) -> None:
    form = {"client_id": "someone-else", "response_type": "code", "redirect_uri": REDIRECT_URI, "decision": "allow"}

    response = requests.post(
        f"{sonos.url}/login/v3/oauth/decision", data=form, allow_redirects=False, timeout=HTTP_TIMEOUT_SEC
    )

    assert response.status_code == 400
    assert "Location" not in response.headers


# -- code exchange ----------------------------------------------------------------------------------


def test_code_exchange_answers_the_documented_token_response_once(sonos: SonosStandIn) -> None:
    code = query_of(sonos.approve(authorize_url(sonos)))["code"]

    first = exchange(sonos, code)
    second = exchange(sonos, code)

    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"access_token", "token_type", "refresh_token", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86399
    assert body["scope"] == "playback-control-all"
    assert first.headers["Cache-Control"] == "no-store"
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert sonos.counts()["token_code"] == 2


def test_code_exchange_with_a_different_redirect_uri_is_invalid_grant_and_spends_the_code(
    sonos: SonosStandIn,
) -> None:
    code = query_of(sonos.approve(authorize_url(sonos)))["code"]

    wrong = exchange(sonos, code, redirect_uri=REDIRECT_URI + "/")
    right_afterwards = exchange(sonos, code)

    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    assert right_afterwards.status_code == 400


def test_code_exchange_after_the_code_ttl_is_invalid_grant(
    make_sonos: Callable[..., SonosStandIn], clock: FakeClock
) -> None:
    sonos = make_sonos(code_ttl_seconds=5)
    fresh_code = query_of(sonos.approve(authorize_url(sonos)))["code"]
    stale_code = query_of(sonos.approve(authorize_url(sonos)))["code"]

    clock.advance(4.9)
    fresh = exchange(sonos, fresh_code)
    clock.advance(0.2)
    stale = exchange(sonos, stale_code)

    assert fresh.status_code == 200
    assert stale.status_code == 400
    assert stale.json()["error"] == "invalid_grant"


def test_unknown_code_is_invalid_grant(sonos: SonosStandIn) -> None:
    response = exchange(sonos, "never-issued")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_wrong_client_secret_is_401_invalid_client(sonos: SonosStandIn) -> None:
    code = query_of(sonos.approve(authorize_url(sonos)))["code"]

    response = token_request(
        sonos,
        {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        auth=(CLIENT_ID, "wrong-secret"),
    )

    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}
    assert exchange(sonos, code).status_code == 200  # a rejected client did not spend the user's code


def test_missing_client_credentials_are_401_invalid_client(sonos: SonosStandIn) -> None:
    response = token_request(sonos, {"grant_type": "refresh_token", "refresh_token": "x"}, auth=None)

    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}


def test_client_credentials_in_the_body_instead_of_basic_auth_are_401(sonos: SonosStandIn) -> None:
    data = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    assert token_request(sonos, data, auth=None).status_code == 401


def test_token_request_without_or_with_unknown_grant_type_is_400_and_counted_as_other(sonos: SonosStandIn) -> None:
    missing = token_request(sonos, {})
    unknown = token_request(sonos, {"grant_type": "password"})

    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    assert (unknown.status_code, unknown.json()["error"]) == (400, "unsupported_grant_type")
    assert sonos.counts()["token_other"] == 2


# -- refresh ----------------------------------------------------------------------------------------


def test_refresh_with_rotation_issues_a_new_refresh_token_and_invalidates_the_old_one(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    refreshed = refresh(sonos, linked["refresh_token"])
    reused = refresh(sonos, linked["refresh_token"])
    next_refresh = refresh(sonos, refreshed.json()["refresh_token"])

    assert refreshed.status_code == 200
    assert refreshed.json()["refresh_token"] != linked["refresh_token"]
    assert refreshed.json()["access_token"] != linked["access_token"]
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_request"
    assert next_refresh.status_code == 200
    assert sonos.counts()["token_refresh"] == 3


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("omit", "absent"), ("empty", ""), ("null", None), ("same", "same")],
)
def test_c3_refresh_without_rotation_carries_the_configured_refresh_token_variant(
    make_sonos: Callable[..., SonosStandIn], variant: str, expected: str | None
) -> None:
    sonos = make_sonos(rotate_refresh_tokens=False, non_rotating_refresh_token=variant)
    linked = link(sonos)

    first = refresh(sonos, linked["refresh_token"])
    second = refresh(sonos, linked["refresh_token"])

    assert first.status_code == 200
    assert second.status_code == 200  # the old refresh token stays valid
    body = first.json()
    if expected == "absent":
        assert "refresh_token" not in body
    elif expected == "same":
        assert body["refresh_token"] == linked["refresh_token"]
    else:
        assert body["refresh_token"] == expected
    assert body["access_token"] != second.json()["access_token"]


def test_c6_refresh_token_revoked_through_configure_answers_400_invalid_request(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    other = link(sonos)

    sonos.configure(revoke_refresh_token=linked["refresh_token"])

    response = refresh(sonos, linked["refresh_token"])
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "error_description": "Invalid refresh token"}
    assert refresh(sonos, other["refresh_token"]).status_code == 200


def test_revoke_all_refresh_tokens_ends_every_grant(sonos: SonosStandIn) -> None:
    grants = [link(sonos), link(sonos)]

    sonos.configure(revoke_all_refresh_tokens=True)

    assert [refresh(sonos, grant["refresh_token"]).status_code for grant in grants] == [400, 400]
    assert [households(sonos, grant["access_token"]).status_code for grant in grants] == [401, 401]


def test_unknown_refresh_token_is_400_invalid_request(sonos: SonosStandIn) -> None:
    response = refresh(sonos, "never-issued")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# -- expires_in -------------------------------------------------------------------------------------


def test_c4_expires_in_can_be_a_number_or_a_string(make_sonos: Callable[..., SonosStandIn]) -> None:
    sonos = make_sonos(expires_in=3600)
    linked = link(sonos)
    assert linked["expires_in"] == 3600

    sonos.configure(expires_in="86399")
    refreshed = refresh(sonos, linked["refresh_token"]).json()

    assert refreshed["expires_in"] == "86399"


def test_c5_expires_in_can_be_omitted(make_sonos: Callable[..., SonosStandIn]) -> None:
    sonos = make_sonos(expires_in=None)

    linked = link(sonos)

    assert "expires_in" not in linked
    assert linked["access_token"]


def test_access_token_stops_working_after_its_expires_in(
    make_sonos: Callable[..., SonosStandIn], clock: FakeClock
) -> None:
    sonos = make_sonos(expires_in="60")
    linked = link(sonos)

    clock.advance(59)
    still_valid = households(sonos, linked["access_token"])
    clock.advance(1)
    expired = households(sonos, linked["access_token"])

    assert still_valid.status_code == 200
    assert expired.status_code == 401
    assert "fault" in expired.json()


# -- households -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_households_lists_the_configured_number_of_sonos_ids(
    make_sonos: Callable[..., SonosStandIn], count: int
) -> None:
    sonos = make_sonos(households=count)
    linked = link(sonos)

    response = households(sonos, linked["access_token"])

    assert response.status_code == 200
    ids = [household["id"] for household in response.json()["households"]]
    assert len(ids) == count
    assert len(set(ids)) == count
    assert all(household_id.startswith("Sonos_") for household_id in ids)
    assert sonos.counts()["households"] == 1


def test_household_ids_are_stable_per_account_and_differ_between_accounts(sonos: SonosStandIn) -> None:
    alice = link(sonos, account="alice")
    alice_ids = households(sonos, alice["access_token"]).json()
    refreshed = refresh(sonos, alice["refresh_token"]).json()
    alice_relinked = link(sonos, account="alice")
    bob = link(sonos, account="bob")
    anonymous = [link(sonos), link(sonos)]

    assert households(sonos, refreshed["access_token"]).json() == alice_ids
    assert households(sonos, alice_relinked["access_token"]).json() == alice_ids
    assert households(sonos, bob["access_token"]).json() != alice_ids
    first, second = (households(sonos, grant["access_token"]).json() for grant in anonymous)
    assert first != second


def test_households_keeps_existing_ids_when_the_count_grows(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    before = households(sonos, linked["access_token"]).json()["households"]

    sonos.configure(households=3)
    after = households(sonos, linked["access_token"]).json()["households"]

    assert after[:1] == before
    assert len(after) == 3


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer never-issued"}, {"Authorization": "Basic c3RhbmRpbi1jbGllbnQ6eA=="}],
)
def test_households_without_a_valid_access_token_is_401_fault(sonos: SonosStandIn, headers: dict[str, str]) -> None:
    response = requests.get(f"{sonos.control_url}/households", headers=headers, timeout=HTTP_TIMEOUT_SEC)

    assert response.status_code == 401
    assert "faultstring" in response.json()["fault"]


# -- revocation endpoint ----------------------------------------------------------------------------


def revoke(sonos: SonosStandIn, token: str, auth: tuple[str, str] | None = CLIENT_AUTH) -> requests.Response:
    return requests.post(f"{sonos.url}/login/v3/oauth/revoke", data={"token": token}, auth=auth, timeout=10)


def test_revoking_the_refresh_token_ends_the_grant(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    response = revoke(sonos, linked["refresh_token"])

    assert response.status_code == 200
    assert refresh(sonos, linked["refresh_token"]).json()["error"] == "invalid_request"
    assert households(sonos, linked["access_token"]).status_code == 401
    assert sonos.counts()["revoke"] == 1


def test_revoking_the_access_token_ends_the_grant(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    assert revoke(sonos, linked["access_token"]).status_code == 200

    assert households(sonos, linked["access_token"]).status_code == 401
    assert refresh(sonos, linked["refresh_token"]).status_code == 400


def test_revoking_an_unknown_token_answers_200_as_rfc_7009_asks(sonos: SonosStandIn) -> None:
    assert revoke(sonos, "never-issued").status_code == 200


def test_revoke_needs_client_credentials(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    response = revoke(sonos, linked["refresh_token"], auth=None)

    assert response.status_code == 401
    assert refresh(sonos, linked["refresh_token"]).status_code == 200


def test_revoke_endpoint_does_not_exist_when_disabled_like_the_real_sonos(
    make_sonos: Callable[..., SonosStandIn],
) -> None:
    sonos = make_sonos(enable_revoke=False)
    linked = link(sonos)

    response = revoke(sonos, linked["refresh_token"])

    assert response.status_code == 404
    assert refresh(sonos, linked["refresh_token"]).status_code == 200


# -- faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_c1_fail_next_answers_the_status_once_then_serves_normally(sonos: SonosStandIn, status: int) -> None:
    linked = link(sonos)
    sonos.configure(fail_next=1, fail_status=status)

    failed = refresh(sonos, linked["refresh_token"])
    recovered = refresh(sonos, linked["refresh_token"])  # the failure did not rotate the refresh token

    assert failed.status_code == status
    assert recovered.status_code == 200
    assert sonos.counts()["token_refresh"] == 2


def test_rate_limit_next_answers_429_with_retry_after(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(rate_limit_next=2, retry_after_seconds=7)

    limited = [refresh(sonos, linked["refresh_token"]) for _ in range(2)]
    served = refresh(sonos, linked["refresh_token"])

    assert [response.status_code for response in limited] == [429, 429]
    assert [response.headers["Retry-After"] for response in limited] == ["7", "7"]
    assert served.status_code == 200


def test_rate_limit_without_retry_after_sends_no_header(sonos: SonosStandIn) -> None:
    sonos.configure(rate_limit_next=1, retry_after_seconds=None)

    response = refresh(sonos, "anything")

    assert response.status_code == 429
    assert "Retry-After" not in response.headers


def test_c6_reset_next_closes_the_connection_without_an_answer(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(reset_next=1)

    with pytest.raises(requests.ConnectionError):
        refresh(sonos, linked["refresh_token"])

    assert refresh(sonos, linked["refresh_token"]).status_code == 200
    assert sonos.counts()["token_refresh"] == 2


def test_hang_next_holds_the_request_past_the_client_timeout(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(hang_next=1, hang_seconds=30)

    with pytest.raises(requests.Timeout):
        refresh(sonos, linked["refresh_token"], timeout=0.2)

    assert refresh(sonos, linked["refresh_token"]).status_code == 200


def test_latency_delays_the_answer_by_at_least_the_configured_seconds(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(latency_seconds=0.2)

    started = time.monotonic()
    response = refresh(sonos, linked["refresh_token"])
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.2
    assert sonos.counts()["token_refresh"] == 1


def test_keep_alive_answers_do_not_stall_on_delayed_acks(make_sonos: Callable[..., SonosStandIn]) -> None:
    # With Nagle on, each answer's body waited for the client's delayed ACK of its headers:
    # about 40 ms per request on a reused connection, added to whatever latency was configured.
    sonos = make_sonos(rotate_refresh_tokens=False)
    linked = link(sonos)
    requests_made = 10

    with requests.Session() as session:
        started = time.monotonic()
        for _ in range(requests_made):
            response = session.post(
                f"{sonos.url}/login/v3/oauth/access",
                data={"grant_type": "refresh_token", "refresh_token": linked["refresh_token"]},
                auth=CLIENT_AUTH,
                timeout=HTTP_TIMEOUT_SEC,
            )
            assert response.status_code == 200
        elapsed = time.monotonic() - started

    assert elapsed < requests_made * 0.04 / 2


def test_c12_invalid_client_mode_rejects_even_the_right_credentials(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(invalid_client=True)

    rejected = refresh(sonos, linked["refresh_token"])
    sonos.configure(invalid_client=False)
    accepted = refresh(sonos, linked["refresh_token"])

    assert rejected.status_code == 401
    assert rejected.json() == {"error": "invalid_client"}
    assert accepted.status_code == 200  # the grant survived


def test_faults_leave_households_alone_unless_asked(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(fail_next=1)

    untouched = households(sonos, linked["access_token"])
    sonos.configure(faults_apply_to_households=True)
    failed = households(sonos, linked["access_token"])

    assert untouched.status_code == 200
    assert failed.status_code == 503


# -- admin endpoints from another client ------------------------------------------------------------


def test_admin_stats_reports_counts_per_endpoint_kind(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    refresh(sonos, linked["refresh_token"])
    households(sonos, linked["access_token"])
    revoke(sonos, linked["access_token"])

    with requests.Session() as admin:
        stats = admin.get(f"{sonos.url}/__admin/stats", timeout=HTTP_TIMEOUT_SEC).json()

    assert stats == {
        "authorize": 1,
        "decision": 1,
        "token_code": 1,
        "token_refresh": 1,
        "token_other": 0,
        "households": 1,
        "revoke": 1,
    }


def test_admin_config_sets_knobs_for_the_next_requests(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    with requests.Session() as admin:
        answer = admin.post(
            f"{sonos.url}/__admin/config",
            json={"fail_next": 1, "fail_status": 500, "expires_in": "120", "households": 2},
            timeout=HTTP_TIMEOUT_SEC,
        )
        read_back = admin.get(f"{sonos.url}/__admin/config", timeout=HTTP_TIMEOUT_SEC).json()["config"]

    assert answer.status_code == 200
    assert read_back["fail_next"] == 1
    assert "client_secret" not in read_back
    assert refresh(sonos, linked["refresh_token"]).status_code == 500
    refreshed = refresh(sonos, linked["refresh_token"]).json()
    assert refreshed["expires_in"] == "120"
    assert len(households(sonos, refreshed["access_token"]).json()["households"]) == 2


def test_admin_config_revokes_a_refresh_token(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    response = requests.post(
        f"{sonos.url}/__admin/config", json={"revoke_refresh_token": linked["refresh_token"]}, timeout=10
    )

    assert response.status_code == 200
    assert refresh(sonos, linked["refresh_token"]).json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        {"no_such_knob": 1},
        {"fail_next": "1"},
        {"fail_next": True},
        {"fail_next": -1},
        {"fail_status": 200},
        {"non_rotating_refresh_token": "sometimes"},
        {"revoke_refresh_token": 5},
        ["fail_next"],
    ],
)
def test_admin_config_refuses_unknown_or_mistyped_knobs_and_changes_nothing(sonos: SonosStandIn, body: Any) -> None:
    before = sonos.config

    response = requests.post(f"{sonos.url}/__admin/config", json=body, timeout=HTTP_TIMEOUT_SEC)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_knobs"
    assert sonos.config == before


def test_admin_reset_clears_counts_faults_and_issued_tokens(sonos: SonosStandIn) -> None:
    linked = link(sonos)
    sonos.configure(fail_next=5, latency_seconds=3.0, households=4)

    response = requests.post(f"{sonos.url}/__admin/reset", timeout=HTTP_TIMEOUT_SEC)

    assert response.status_code == 200
    assert set(sonos.counts().values()) == {0}
    assert sonos.config == StandInConfig()
    stale = refresh(sonos, linked["refresh_token"])
    assert stale.status_code == 400  # no fault left: the unknown token is judged
    assert households(sonos, linked["access_token"]).status_code == 401


def test_reset_restores_the_knobs_the_stand_in_started_with(make_sonos: Callable[..., SonosStandIn]) -> None:
    sonos = make_sonos(households=3, rotate_refresh_tokens=False)
    sonos.configure(households=1, fail_next=2)

    sonos.reset()

    assert sonos.config == StandInConfig(households=3, rotate_refresh_tokens=False)


# -- concurrency ------------------------------------------------------------------------------------


def refresh_concurrently(sonos: SonosStandIn, refresh_token: str, callers: int) -> list[requests.Response]:
    barrier = threading.Barrier(callers)
    responses: list[requests.Response] = []
    responses_lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        response = refresh(sonos, refresh_token)
        with responses_lock:
            responses.append(response)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_counts_stay_exact_under_20_concurrent_refreshes(make_sonos: Callable[..., SonosStandIn]) -> None:
    sonos = make_sonos(rotate_refresh_tokens=False)
    linked = link(sonos)

    responses = refresh_concurrently(sonos, linked["refresh_token"], callers=20)

    assert [response.status_code for response in responses] == [200] * 20
    assert len({response.json()["access_token"] for response in responses}) == 20
    assert sonos.counts()["token_refresh"] == 20


def test_concurrent_refreshes_of_a_rotating_token_have_exactly_one_winner(sonos: SonosStandIn) -> None:
    linked = link(sonos)

    responses = refresh_concurrently(sonos, linked["refresh_token"], callers=20)

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [400] * 19
    assert sonos.counts()["token_refresh"] == 20


# -- lifecycle, privacy, command line ----------------------------------------------------------------


def test_stop_ends_keep_alive_connections_too(clock: FakeClock) -> None:
    sonos = SonosStandIn(clock=clock).start()
    url = sonos.url
    with requests.Session() as session:
        assert session.get(f"{url}/__admin/stats", timeout=HTTP_TIMEOUT_SEC).status_code == 200

        sonos.stop()

        with pytest.raises(requests.ConnectionError):
            session.get(f"{url}/__admin/stats", timeout=HTTP_TIMEOUT_SEC)


def test_context_manager_starts_and_stops(clock: FakeClock) -> None:
    with SonosStandIn(clock=clock) as sonos:
        url = sonos.url
        assert requests.get(f"{url}/__admin/stats", timeout=HTTP_TIMEOUT_SEC).status_code == 200

    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/__admin/stats", timeout=HTTP_TIMEOUT_SEC)


def test_unknown_paths_are_404_and_wrong_methods_405(sonos: SonosStandIn) -> None:
    assert requests.get(f"{sonos.url}/nowhere", timeout=HTTP_TIMEOUT_SEC).status_code == 404
    wrong_method = requests.get(f"{sonos.url}/login/v3/oauth/access", timeout=HTTP_TIMEOUT_SEC)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"


def test_config_repr_hides_the_client_secret() -> None:
    config = StandInConfig(client_secret="marker-secret-c0ffee")

    assert "marker-secret-c0ffee" not in repr(config)
    assert dataclasses.replace(config, households=2).client_secret == "marker-secret-c0ffee"


def test_request_log_names_paths_but_never_tokens_codes_or_state(
    make_sonos: Callable[..., SonosStandIn], capfd: pytest.CaptureFixture[str]
) -> None:
    sonos = make_sonos(log_requests=True)
    callback = sonos.approve(authorize_url(sonos, state="marker-state-5150"))
    code = query_of(callback)["code"]
    linked = exchange(sonos, code).json()
    refreshed = refresh(sonos, linked["refresh_token"]).json()
    households(sonos, refreshed["access_token"])
    revoke(sonos, refreshed["refresh_token"])

    out, err = capfd.readouterr()

    assert "POST /login/v3/oauth/access 200" in err
    assert "GET /login/v3/oauth 200" in err
    secrets = [code, "marker-state-5150", CLIENT_SECRET]
    secrets += [grant[name] for grant in (linked, refreshed) for name in ("access_token", "refresh_token")]
    for secret in secrets:
        assert secret not in out + err


def test_command_line_prints_the_urls_and_never_the_secret_or_tokens(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "devtools.sonos_standin",
        "--port",
        "0",
        "--households",
        "3",
        "--client-secret",
        "marker-secret-c0ffee",
        "--log-requests",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(6)]
        auth_base = next(line for line in lines if line.startswith("SONOS_AUTH_BASE_URL=")).strip().split("=", 1)[1]
        control_base = next(line for line in lines if line.startswith("SONOS_CONTROL_BASE_URL=")).strip()
        assert control_base == f"SONOS_CONTROL_BASE_URL={auth_base}/control/api/v1"

        params = {"client_id": CLIENT_ID, "response_type": "code", "state": "s", "redirect_uri": REDIRECT_URI}
        # approve() only drives the consent page over HTTP, so an instance that is not running will do.
        callback = SonosStandIn().approve(f"{auth_base}/login/v3/oauth?{urlencode(params)}")
        code = query_of(callback)["code"]
        tokens = requests.post(
            f"{auth_base}/login/v3/oauth/access",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
            auth=(CLIENT_ID, "marker-secret-c0ffee"),
            timeout=HTTP_TIMEOUT_SEC,
        ).json()
        listed = requests.get(
            f"{auth_base}/control/api/v1/households",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
            timeout=HTTP_TIMEOUT_SEC,
        ).json()
        assert len(listed["households"]) == 3
    finally:
        process.send_signal(signal.SIGTERM)
        rest_out, err = process.communicate(timeout=HTTP_TIMEOUT_SEC)

    assert process.returncode == 0
    printed = "".join(lines) + rest_out + err
    assert "POST /login/v3/oauth/access 200" in err
    for secret in ("marker-secret-c0ffee", code, tokens["access_token"], tokens["refresh_token"]):
        assert secret not in printed


def test_command_line_takes_the_client_secret_from_the_environment_so_argv_never_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CLIENT_SECRET_ENV, raising=False)
    assert _parse_args([]).client_secret == StandInConfig.client_secret

    monkeypatch.setenv(CLIENT_SECRET_ENV, "marker-secret-from-env")
    assert _parse_args([]).client_secret == "marker-secret-from-env"
    assert _parse_args(["--client-secret", "marker-flag"]).client_secret == "marker-flag"

    monkeypatch.setenv(CLIENT_SECRET_ENV, "")
    assert _parse_args([]).client_secret == StandInConfig.client_secret
