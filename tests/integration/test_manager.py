"""SonosTokenManager on the real Redis and Postgres: lifecycle rules and field cases C1-C12."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
import requests
import responses

from tests.support.manager_env import (
    CLIENT_ID,
    CLIENT_SECRET,
    HOUSEHOLDS_URL,
    REDIRECT_URI,
    TOKEN_URL,
    Clock,
    ManagerEnv,
    RecordingNotifier,
    form,
    iter_log_texts,
    json_callback,
    query,
    token_calls,
)
from tests.support.secrets_scan import find_leaks
from token_manager.cache import RedisCache
from token_manager.crypto import KeyRing
from token_manager.errors import (
    ConfigurationError,
    HouseholdNotLinked,
    InvalidRedirectUri,
    InvalidRequest,
    InvalidState,
    NotConnected,
    ReconnectRequired,
    StorageUnavailable,
    UpstreamUnavailable,
)
from token_manager.manager import RefreshOutcome, SonosTokenManager
from token_manager.models import TokenStatus
from token_manager.settings import parse_redirect_uris

pytestmark = pytest.mark.integration

LINK_ACCESS = "access-MARKER-link-0001"
LINK_REFRESH = "refresh-MARKER-link-0001"
DAY = 86399


@pytest.fixture
def env(database_url: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> Iterator[ManagerEnv]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("truncate sonos_tokens")
    RedisCache.from_url(redis_url)._client.flushdb()
    ring = KeyRing.generate()
    environment = ManagerEnv(
        database_url=database_url,
        redis_url=redis_url,
        ring=ring,
        clock=Clock(),
        notifier=RecordingNotifier(),
        sleeps=[],
        secrets={CLIENT_SECRET, LINK_ACCESS, LINK_REFRESH, *(k.hex() for k in ring.keys.values())},
    )
    caplog.set_level(logging.DEBUG)
    yield environment
    # Every test ends with a secret scan of everything that was logged.
    leaks = find_leaks(environment.secrets, iter_log_texts(iter(caplog.records)))
    assert leaks == [], f"secrets found in logs: {leaks}"


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def stored(env: ManagerEnv, user_id: str = "user-1"):  # type: ignore[no-untyped-def]
    return env.manager()._store.get(user_id)


def decrypt(env: ManagerEnv, grant, field: str) -> str:  # type: ignore[no-untyped-def]
    ciphertext = grant.access_token_encrypted if field == "access_token" else grant.refresh_token_encrypted
    return env.manager()._cipher.decrypt(ciphertext, key_id=grant.encryption_key_id, user_id=grant.user_id, field=field)


def fetch_all_at_once(managers: list[SonosTokenManager], user_id: str) -> list[str]:
    """Every manager (one per "container") fetches on its own thread, released together."""
    barrier = threading.Barrier(len(managers))
    results: list[str] = []
    errors: list[BaseException] = []

    def call(manager: SonosTokenManager) -> None:
        barrier.wait()
        try:
            results.append(manager.get_token(user_id).access_token)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


def age_to(env: ManagerEnv, seconds_before_expiry: float, user_id: str = "user-1") -> None:
    """Move the clock so the stored token expires in ``seconds_before_expiry`` seconds."""
    grant = stored(env, user_id)
    env.clock.now = grant.expires_at - timedelta(seconds=seconds_before_expiry)


# ---------------------------------------------------------------- linking


def test_link_stores_encrypted_tokens_and_households(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps, households=("Sonos_A", "Sonos_B"))
    grant = stored(env)
    assert grant.token_status is TokenStatus.ACTIVE
    assert grant.household_id == "Sonos_A"
    assert grant.household_ids == ("Sonos_A", "Sonos_B")
    assert grant.encryption_key_id == env.ring.active_key_id
    assert LINK_ACCESS not in grant.access_token_encrypted
    assert decrypt(env, grant, "access_token") == LINK_ACCESS
    assert decrypt(env, grant, "refresh_token") == LINK_REFRESH
    assert grant.expires_at == env.clock.now + timedelta(seconds=DAY)
    with psycopg.connect(env.database_url) as conn:
        row = conn.execute("select * from sonos_tokens").fetchone()
    assert not any(LINK_ACCESS in str(v) or LINK_REFRESH in str(v) for v in row)


def test_initiate_builds_authorize_url_with_single_use_state(env: ManagerEnv) -> None:
    request = env.manager().initiate_oauth_flow("user-1")
    params = query(request.authorization_url)
    assert request.authorization_url.startswith("https://api.sonos.test/login/v3/oauth?")
    assert params == {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "state": request.state,
        "scope": "playback-control-all",
        "redirect_uri": REDIRECT_URI,
    }
    assert request.expires_in == 600
    ttl = env.redis().ttl(f"sonos:oauth:state:{request.state}")
    assert 590 < ttl <= 600


@pytest.mark.parametrize("user_id", ["", " ", "a b", "x" * 257, None, 42, "tab\tchar"])
def test_initiate_refuses_bad_user_ids(env: ManagerEnv, user_id: object) -> None:
    with pytest.raises(InvalidRequest):
        env.manager().initiate_oauth_flow(user_id)  # type: ignore[arg-type]


def test_relinking_replaces_the_old_grant(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    first = stored(env)
    manager = env.manager()
    assert manager.get_token("user-1").access_token == LINK_ACCESS  # now cached
    env.link(rsps, access="access-MARKER-relink", refresh="refresh-MARKER-relink", households=("Sonos_NEW",))
    second = stored(env)
    assert second.version > first.version
    assert second.household_ids == ("Sonos_NEW",)
    assert manager.get_token("user-1").access_token == "access-MARKER-relink"


# ------------------------------------------------------------------ fetch


def test_fetch_serves_from_cache_then_store(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    manager = env.manager()
    first = manager.get_token("user-1")
    assert first.access_token == LINK_ACCESS
    assert first.household_ids == ("Sonos_HH1",)
    assert env.redis().exists("sonos:token:user-1")
    assert LINK_ACCESS.encode() not in env.redis().get("sonos:token:user-1")
    env.redis().delete("sonos:token:user-1")
    assert manager.get_token("user-1").access_token == LINK_ACCESS
    assert token_calls(rsps) == []


def test_cache_ttl_never_outlives_the_refresh_point(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 300 + 120)  # refresh point in 120 s
    env.manager().get_token("user-1")
    ttl = env.redis().pttl("sonos:token:user-1") / 1000
    assert 0 < ttl <= 120


def test_fetch_unknown_user_is_not_connected(env: ManagerEnv) -> None:
    with pytest.raises(NotConnected):
        env.manager().get_token("nobody")


def test_household_not_among_the_grants_households(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps, households=("Sonos_A", "Sonos_B"))
    manager = env.manager()
    assert manager.get_token("user-1", "Sonos_B").household_id == "Sonos_B"
    with pytest.raises(HouseholdNotLinked):
        manager.get_token("user-1", "Sonos_OTHER")
    env.redis().flushdb()
    with pytest.raises(HouseholdNotLinked):
        manager.get_token("user-1", "Sonos_OTHER")


def test_fetch_works_from_the_store_when_redis_is_down(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    manager = env.manager(cache=RedisCache.from_url("redis://127.0.0.1:1/0"))
    assert manager.get_token("user-1").access_token == LINK_ACCESS
    with pytest.raises(StorageUnavailable):
        manager.initiate_oauth_flow("user-2")


# --------------------------------------------------------- C1: transient 503


@pytest.mark.parametrize(
    "first_failure", [503, requests.exceptions.ConnectTimeout("timed out")], ids=["503", "timeout"]
)
def test_c1_transient_failure_once_then_success(
    env: ManagerEnv, rsps: responses.RequestsMock, first_failure: object
) -> None:
    env.link(rsps)
    age_to(env, 60)
    if isinstance(first_failure, int):
        rsps.add(responses.POST, TOKEN_URL, status=first_failure, json={"error": "unavailable"})
    else:
        rsps.add(responses.POST, TOKEN_URL, body=first_failure)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-c1", "refresh-MARKER-c1"))
    token = env.manager().get_token("user-1")
    assert token.access_token == "access-MARKER-c1"
    assert len(token_calls(rsps)) == 2
    assert stored(env).token_status is TokenStatus.ACTIVE
    assert env.notifier.events == []


# ------------------------------------------------------- C2: single flight


def test_c2_fifty_threads_one_refresh(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 30)

    def slow_refresh(n: int) -> tuple[int, dict[str, object]]:
        threading.Event().wait(0.3)  # Sonos takes 300 ms to answer
        return 200, env.token_json("access-MARKER-c2", "refresh-MARKER-c2")

    rsps.add_callback(responses.POST, TOKEN_URL, callback=json_callback(slow_refresh))
    results = fetch_all_at_once([env.manager() for _ in range(50)], "user-1")
    assert len(token_calls(rsps)) == 1
    assert results == ["access-MARKER-c2"] * 50


def test_c2_counterfactual_without_the_lock_the_same_load_refreshes_more_than_once(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    # The same load as test_c2_fifty_threads_one_refresh with the lock switched off: proves
    # that the lock, not luck or the test's timing, is what keeps Sonos to one request.
    env.link(rsps)
    age_to(env, 30)

    def slow_refresh(n: int) -> tuple[int, dict[str, object]]:
        threading.Event().wait(0.3)
        return 200, env.token_json("access-MARKER-nolock", "refresh-MARKER-nolock")

    rsps.add_callback(responses.POST, TOKEN_URL, callback=json_callback(slow_refresh))
    fetch_all_at_once([env.manager(use_refresh_lock=False) for _ in range(50)], "user-1")
    assert len(token_calls(rsps)) > 1


def test_c2_without_redis_the_version_check_keeps_one_winner(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 30)
    calls = iter(range(100))
    rsps.add_callback(
        responses.POST,
        TOKEN_URL,
        callback=json_callback(
            lambda n: (200, env.token_json(f"access-MARKER-nolock-{next(calls)}", "refresh-MARKER-x"))
        ),
    )
    down = "redis://127.0.0.1:1/0"
    a = env.manager(cache=RedisCache.from_url(down))
    b = env.manager(cache=RedisCache.from_url(down))
    grant = stored(env)
    first = a._refresh_for_caller(grant).token
    second = b._refresh_for_caller(grant).token  # read the same version: loses, returns the winner's
    assert second.access_token == first.access_token
    assert decrypt(env, stored(env), "access_token") == first.access_token


# ------------------------------------------- C3: refresh token not rotated


@pytest.mark.parametrize("refresh_value", ["absent", "", None], ids=["absent", "empty", "null"])
def test_c3_refresh_keeps_old_refresh_token_when_response_has_none(
    env: ManagerEnv, rsps: responses.RequestsMock, refresh_value: object
) -> None:
    env.link(rsps)
    age_to(env, 60)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-c3", refresh_value))  # type: ignore[arg-type]
    token = env.manager().get_token("user-1")
    grant = stored(env)
    assert token.access_token == "access-MARKER-c3"
    assert decrypt(env, grant, "refresh_token") == LINK_REFRESH
    assert decrypt(env, grant, "access_token") == "access-MARKER-c3"
    assert grant.expires_at == env.clock.now + timedelta(seconds=DAY)


def test_rotated_refresh_token_replaces_the_stored_one(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 60)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-rot", "refresh-MARKER-rotated"))
    env.manager().get_token("user-1")
    assert decrypt(env, stored(env), "refresh_token") == "refresh-MARKER-rotated"
    assert form(token_calls(rsps)[0].request) == {"grant_type": "refresh_token", "refresh_token": LINK_REFRESH}


# ------------------------------------------------------------ C4: expiry


def test_c4_token_expiring_in_10_seconds_is_refreshed_before_return(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    env.link(rsps)
    env.manager().get_token("user-1")  # warm the cache
    age_to(env, 10)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-c4", "refresh-MARKER-c4"))
    assert env.manager().get_token("user-1").access_token == "access-MARKER-c4"
    assert len(token_calls(rsps)) == 1


def test_c4_string_expires_in_is_parsed_as_seconds(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps, expires_in="86399")
    assert stored(env).expires_at == env.clock.now + timedelta(seconds=86399)


# ----------------------------------------------- C5: exchange without expiry


def test_c5_exchange_without_expires_in_stores_nothing(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    manager = env.manager()
    request = manager.initiate_oauth_flow("user-1")
    body = env.token_json(LINK_ACCESS, LINK_REFRESH)
    del body["expires_in"]
    rsps.add(responses.POST, TOKEN_URL, json=body)
    with pytest.raises(UpstreamUnavailable, match="unusable"):
        manager.handle_oauth_callback("code-MARKER-c5", request.state)
    assert stored(env) is None
    assert len(token_calls(rsps)) == 1


# ------------------------------------------------ C6: permanent rejection


@pytest.mark.parametrize("error", ["invalid_request", "invalid_grant"])
def test_c6_permanent_refresh_failure_expires_grant_once(
    env: ManagerEnv, rsps: responses.RequestsMock, error: str
) -> None:
    env.link(rsps)
    manager = env.manager()
    manager.get_token("user-1")  # cached
    age_to(env, 60)
    rsps.add(responses.POST, TOKEN_URL, status=400, json={"error": error})
    with pytest.raises(ReconnectRequired):
        manager.get_token("user-1")
    assert len(token_calls(rsps)) == 1
    grant = stored(env)
    assert grant.token_status is TokenStatus.EXPIRED
    assert grant.access_token_encrypted is None
    assert grant.refresh_token_encrypted is None
    assert grant.last_error_code == error
    assert not env.redis().exists("sonos:token:user-1")
    assert env.notifier.events == [("user-1", error)]
    with pytest.raises(ReconnectRequired):
        env.manager().get_token("user-1")
    assert len(token_calls(rsps)) == 1
    assert env.manager().mark_token_expired("user-1", error) is False
    assert env.notifier.events == [("user-1", error)]


@pytest.mark.parametrize(
    "failure", [500, requests.exceptions.ConnectionError("connection reset by peer")], ids=["500", "reset"]
)
def test_c6_server_errors_and_resets_are_retried_not_permanent(
    env: ManagerEnv, rsps: responses.RequestsMock, failure: object
) -> None:
    env.link(rsps)
    age_to(env, 60)
    for _ in range(3):
        if isinstance(failure, int):
            rsps.add(responses.POST, TOKEN_URL, status=failure)
        else:
            rsps.add(responses.POST, TOKEN_URL, body=failure)
    # Rule 1: the still-valid token is returned when the early refresh fails transiently.
    assert env.manager().get_token("user-1").access_token == LINK_ACCESS
    assert len(token_calls(rsps)) == 3
    grant = stored(env)
    assert grant.token_status is TokenStatus.ACTIVE
    assert grant.refresh_failure_count == 1
    assert env.notifier.events == []


def test_expired_token_with_sonos_down_answers_upstream_unavailable(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    env.link(rsps)
    age_to(env, -5)
    for _ in range(3):
        rsps.add(responses.POST, TOKEN_URL, status=503)
    with pytest.raises(UpstreamUnavailable):
        env.manager().get_token("user-1")
    assert stored(env).token_status is TokenStatus.ACTIVE


# ------------------------------------------------ C7: double callback


def test_c7_same_callback_twice_exchanges_once(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    manager = env.manager()
    request = manager.initiate_oauth_flow("user-1")
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    first = manager.handle_oauth_callback("code-MARKER-c7", request.state)
    env.clock.advance(1)
    second = env.manager().handle_oauth_callback("code-MARKER-c7", request.state)
    assert (first.user_id, first.household_id) == (second.user_id, second.household_id)
    assert second.repeated
    assert len(token_calls(rsps)) == 1
    assert decrypt(env, stored(env), "access_token") == LINK_ACCESS


def test_c7_concurrent_double_click_exchanges_once(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    request = env.manager().initiate_oauth_flow("user-1")

    def slow_exchange(n: int) -> tuple[int, dict[str, object]]:
        threading.Event().wait(0.3)
        return 200, env.token_json(LINK_ACCESS, LINK_REFRESH)

    rsps.add_callback(responses.POST, TOKEN_URL, callback=json_callback(slow_exchange))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    results: list[object] = []
    managers = [env.manager(sleep=lambda s: threading.Event().wait(s)) for _ in range(2)]

    def click(manager):  # type: ignore[no-untyped-def]
        try:
            results.append(manager.handle_oauth_callback("code-MARKER-c7b", request.state).user_id)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=click, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["user-1", "user-1"]
    assert len(token_calls(rsps)) == 1


# ------------------------------------------------------------- C8: state


def test_c8_state_lifecycle(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    request = env.manager().initiate_oauth_flow("user-1")
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    assert env.manager().handle_oauth_callback("code-MARKER-c8", request.state).user_id == "user-1"
    assert env.manager().handle_oauth_callback("code-MARKER-c8", request.state).repeated
    # Older than 10 minutes: Redis has expired both the state and its outcome.
    old = env.manager().initiate_oauth_flow("user-2")
    env.redis().delete(f"sonos:oauth:state:{old.state}")
    with pytest.raises(InvalidState):
        env.manager().handle_oauth_callback("code-MARKER-c8-old", old.state)
    with pytest.raises(InvalidState):
        env.manager().handle_oauth_callback("code-MARKER-c8-never", "never-issued-state")
    for bad in ["", "a" * 500, "bad state!", None]:
        with pytest.raises(InvalidState):
            env.manager().handle_oauth_callback("code", bad)
    assert len(token_calls(rsps)) == 1


def test_denied_consent_stores_nothing_and_consumes_state(env: ManagerEnv) -> None:
    from token_manager.errors import AccessDenied

    request = env.manager().initiate_oauth_flow("user-1")
    with pytest.raises(AccessDenied):
        env.manager().handle_oauth_callback(None, request.state, error="access_denied")
    with pytest.raises(AccessDenied):  # a repeat answers the same
        env.manager().handle_oauth_callback(None, request.state, error="access_denied")
    with pytest.raises(AccessDenied):
        env.manager().handle_oauth_callback("code-late", request.state)
    assert stored(env) is None


# ------------------------------------------------------ C9: redirect URIs


def test_c9_registered_uri_with_trailing_slash_is_sent_byte_identical(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    manager = env.manager()
    request = manager.initiate_oauth_flow("user-1", REDIRECT_URI)
    assert query(request.authorization_url)["redirect_uri"] == "https://example.test/sonos/callback/"
    assert "redirect_uri=https%3A%2F%2Fexample.test%2Fsonos%2Fcallback%2F" in request.authorization_url
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    manager.handle_oauth_callback("code-MARKER-c9", request.state)
    assert form(token_calls(rsps)[0].request)["redirect_uri"] == "https://example.test/sonos/callback/"


@pytest.mark.parametrize(
    "uri", ["https://evil.test/cb", "https://example.test/sonos/callback", "https://example.test/sonos/callback/?x=1"]
)
def test_c9_foreign_redirect_uri_is_refused(env: ManagerEnv, uri: str) -> None:
    with pytest.raises(InvalidRedirectUri):
        env.manager().initiate_oauth_flow("user-1", uri)


@pytest.mark.parametrize("configured", ["http://example.test/cb", "ftp://example.test/cb", "example.test/cb"])
def test_c9_plain_http_configuration_is_refused_at_load(configured: str) -> None:
    with pytest.raises(ConfigurationError, match="SONOS_REDIRECT_URI"):
        parse_redirect_uris(configured)


def test_c9_localhost_http_is_allowed() -> None:
    assert parse_redirect_uris("http://127.0.0.1:3000/cb, http://localhost/cb") == (
        "http://127.0.0.1:3000/cb",
        "http://localhost/cb",
    )


# ------------------------------------------------ C10: revoke during refresh


def test_c10_refresh_finishing_after_revoke_writes_nothing(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 60)
    revoker = env.manager()

    def revoke_then_answer(n: int) -> tuple[int, dict[str, object]]:
        assert revoker.revoke_token("user-1").revoked
        return 200, env.token_json("access-MARKER-late", "refresh-MARKER-late")

    rsps.add_callback(responses.POST, TOKEN_URL, callback=json_callback(revoke_then_answer))
    with pytest.raises(NotConnected):
        env.manager().get_token("user-1")
    assert stored(env) is None
    assert not env.redis().exists("sonos:token:user-1")
    with pytest.raises(NotConnected):
        env.manager().get_token("user-1")


def test_revoke_is_idempotent_and_clears_cache_and_lock(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    manager = env.manager()
    manager.get_token("user-1")
    env.redis().set("sonos:lock:refresh:user-1", "someone")
    result = manager.revoke_token("user-1")
    assert (result.revoked, result.provider_revoked) == (True, False)
    assert not env.redis().exists("sonos:token:user-1", "sonos:lock:refresh:user-1")
    again = manager.revoke_token("user-1")
    assert (again.revoked, again.provider_revoked) == (False, False)
    with pytest.raises(NotConnected):
        manager.get_token("user-1")


def test_revoke_calls_a_configured_provider_endpoint(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    rsps.add(responses.POST, "https://api.sonos.test/revoke", status=200)
    result = env.manager(revoke_url="https://api.sonos.test/revoke").revoke_token("user-1")
    assert (result.revoked, result.provider_revoked) == (True, True)


def test_revoke_deletes_locally_when_provider_revocation_fails(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    rsps.add(responses.POST, "https://api.sonos.test/revoke", status=500)
    result = env.manager(revoke_url="https://api.sonos.test/revoke").revoke_token("user-1")
    assert (result.revoked, result.provider_revoked) == (True, False)
    assert stored(env) is None


# ---------------------------------------------------- C11: short lifetimes


def test_c11_short_lived_token_does_not_refresh_on_every_fetch(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 60)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-c11a", "refresh-MARKER-c11a", 60))
    manager = env.manager()
    assert manager.get_token("user-1").access_token == "access-MARKER-c11a"
    for _ in range(5):
        env.clock.advance(1)
        assert manager.get_token("user-1").access_token == "access-MARKER-c11a"
    env.redis().flushdb()  # the store path agrees with the cache path
    assert manager.get_token("user-1").access_token == "access-MARKER-c11a"
    assert len(token_calls(rsps)) == 1
    env.clock.advance(30)  # past half the 60 s lifetime: due again
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-c11b", "refresh-MARKER-c11b", 60))
    assert manager.get_token("user-1").access_token == "access-MARKER-c11b"
    assert len(token_calls(rsps)) == 2


# ------------------------------------------------------ C12: invalid_client


def test_c12_invalid_client_is_our_configuration_not_the_grant(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    age_to(env, 60)
    rsps.add(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_client"})
    with pytest.raises(ConfigurationError):
        env.manager().get_token("user-1")
    assert len(token_calls(rsps)) == 1
    grant = stored(env)
    assert grant.token_status is TokenStatus.ACTIVE
    assert decrypt(env, grant, "refresh_token") == LINK_REFRESH
    assert env.notifier.events == []


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (401, {"error": "invalid_client"}, "Sonos rejected the client credentials (invalid_client)."),
        (
            404,
            {"error": "server_error"},
            "Sonos refused this service's request (HTTP 404): check the Sonos client settings and URLs.",
        ),
        (
            403,
            {},
            "Sonos refused this service's request (HTTP 403): check the Sonos client settings and URLs.",
        ),
    ],
    ids=["invalid-client", "404", "403"],
)
def test_c12_a_refusal_of_our_client_is_named_by_what_sonos_answered(
    env: ManagerEnv, rsps: responses.RequestsMock, status: int, body: dict[str, str], message: str
) -> None:
    # Only invalid_client is called a credentials problem; any other unexpected refusal
    # (a wrong token URL, a proxy) names its status, so on-call looks in the right place.
    env.link(rsps)
    age_to(env, -1)
    rsps.add(responses.POST, TOKEN_URL, status=status, json=body)
    with pytest.raises(ConfigurationError) as raised:
        env.manager().get_token("user-1")
    assert raised.value.message == message
    assert stored(env).token_status is TokenStatus.ACTIVE
    assert len(token_calls(rsps)) == 1


def test_a_new_grant_the_store_cannot_take_is_revoked_at_sonos(
    env: ManagerEnv, rsps: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoke_url = "https://api.sonos.test/revoke"
    manager = env.manager(revoke_url=revoke_url)
    request = manager.initiate_oauth_flow("user-1")
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    rsps.add(responses.POST, revoke_url, status=200)

    def store_down(grant: object) -> object:
        raise StorageUnavailable()

    monkeypatch.setattr(manager._store, "link", store_down)
    with pytest.raises(StorageUnavailable):
        manager.handle_oauth_callback("code-MARKER-unkept", request.state)

    revokes = [call for call in rsps.calls if call.request.url == revoke_url]
    assert [form(call.request)["token"] for call in revokes] == [LINK_REFRESH]
    assert stored(env) is None


def test_an_account_without_households_is_refused_and_its_new_grant_revoked(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    revoke_url = "https://api.sonos.test/revoke"
    manager = env.manager(revoke_url=revoke_url)
    request = manager.initiate_oauth_flow("user-1")
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": []})
    rsps.add(responses.POST, revoke_url, status=200)

    with pytest.raises(HouseholdNotLinked, match="no household yet"):
        manager.handle_oauth_callback("code-MARKER-nohh", request.state)

    assert len([call for call in rsps.calls if call.request.url == revoke_url]) == 1
    assert stored(env) is None
    with pytest.raises(HouseholdNotLinked):  # a reload answers the same, with no second exchange
        env.manager().handle_oauth_callback("code-MARKER-nohh", request.state)
    assert len(token_calls(rsps)) == 1


def test_a_code_exchange_sonos_did_not_answer_can_be_retried_with_the_same_callback(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    manager = env.manager()
    request = manager.initiate_oauth_flow("user-1")
    for _ in range(3):
        rsps.add(responses.POST, TOKEN_URL, status=503)
    with pytest.raises(UpstreamUnavailable, match="reload this page"):
        manager.handle_oauth_callback("code-MARKER-retry", request.state)
    assert stored(env) is None

    rsps.add(responses.POST, TOKEN_URL, json=env.token_json(LINK_ACCESS, LINK_REFRESH))
    rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_HH1"}]})
    result = env.manager().handle_oauth_callback("code-MARKER-retry", request.state)

    assert not result.repeated
    assert decrypt(env, stored(env), "access_token") == LINK_ACCESS
    assert [form(call.request)["code"] for call in token_calls(rsps)] == ["code-MARKER-retry"] * 4


# -------------------------------------------------------- refresher steps


def test_refresh_if_due_outcomes(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    manager = env.manager()
    horizon = env.clock.now + timedelta(minutes=10)
    assert manager.refresh_if_due(stored(env), horizon) is RefreshOutcome.NOT_DUE
    age_to(env, 400)  # refresh point in 100 s: due before the horizon
    horizon = env.clock.now + timedelta(minutes=10)
    env.redis().set("sonos:lock:refresh:user-1", "other-container")
    assert manager.refresh_if_due(stored(env), horizon) is RefreshOutcome.SKIPPED
    env.redis().delete("sonos:lock:refresh:user-1")
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-bg", "refresh-MARKER-bg"))
    assert manager.refresh_if_due(stored(env), horizon) is RefreshOutcome.REFRESHED
    assert len(token_calls(rsps)) == 1


def test_forced_refresh_token(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    rsps.add(responses.POST, TOKEN_URL, json=env.token_json("access-MARKER-forced", "refresh-MARKER-forced"))
    assert env.manager().refresh_token("user-1").access_token == "access-MARKER-forced"


def test_unknown_key_id_reloads_the_ring_once(env: ManagerEnv, rsps: responses.RequestsMock) -> None:
    env.link(rsps)
    rotated = env.ring.with_new_active_key()
    from token_manager.crypto import TokenCipher

    # Another container rotated and rewrote the row under the new key.
    writer = env.manager(cipher=TokenCipher(rotated))
    grant = stored(env)
    writer._store.reencrypt(
        "user-1",
        grant.version,
        TokenCipher(rotated).encrypt(LINK_ACCESS, user_id="user-1", field="access_token"),
        TokenCipher(rotated).encrypt(LINK_REFRESH, user_id="user-1", field="refresh_token"),
        rotated.active_key_id,
    )
    stale = env.manager(reload_key_ring=lambda: rotated)
    assert stale.get_token("user-1").access_token == LINK_ACCESS
    no_reload = env.manager()
    env.redis().flushdb()
    with pytest.raises(ConfigurationError):
        no_reload.get_token("user-1")
    assert stored(env).token_status is TokenStatus.ACTIVE


def test_cache_fill_racing_a_revoke_does_not_bring_the_token_back(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    env.link(rsps)
    manager = env.manager()
    read_before_revoke = stored(env)
    manager.revoke_token("user-1")
    manager._fill_cache(read_before_revoke, manager._to_access_token(read_before_revoke))
    assert not env.redis().exists("sonos:token:user-1")
    env.link(rsps, access="access-MARKER-again", refresh="refresh-MARKER-again")  # a new link allows fills again
    assert manager.get_token("user-1").access_token == "access-MARKER-again"
    assert env.redis().exists("sonos:token:user-1")


def test_without_the_lock_a_refusal_caused_by_a_concurrent_rotation_does_not_expire_the_grant(
    env: ManagerEnv, rsps: responses.RequestsMock
) -> None:
    # Redis is down, so both containers refresh. Sonos rotates the refresh token for the
    # winner and refuses the loser's (just replaced) one; the loser reads the row before the
    # winner's write lands. Expiring the grant then would make the winner's write lose.
    from token_manager.store.postgres import PostgresTokenStore

    env.link(rsps)
    age_to(env, 60)
    loser_refused = threading.Event()
    loser_read_after_refusal = threading.Event()

    def sonos(n: int) -> tuple[int, dict[str, object]]:
        if n == 0:
            return 200, env.token_json("access-MARKER-winner", "refresh-MARKER-winner")
        loser_refused.set()
        return 400, {"error": "invalid_grant"}

    class LoserStore(PostgresTokenStore):
        def get(self, user_id: str):  # type: ignore[no-untyped-def]
            row = super().get(user_id)
            if loser_refused.is_set():
                loser_read_after_refusal.set()
            return row

    class WinnerStore(PostgresTokenStore):
        def update_tokens(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            loser_read_after_refusal.wait(5)
            threading.Event().wait(0.03)  # the loser has acted on what it read by now
            return super().update_tokens(*args, **kwargs)

    rsps.add_callback(responses.POST, TOKEN_URL, callback=json_callback(sonos))
    down = RedisCache.from_url("redis://127.0.0.1:1/0")
    real_sleep = lambda s: threading.Event().wait(s)  # noqa: E731
    winner = env.manager(cache=down, store=WinnerStore(env.database_url), sleep=real_sleep)
    loser = env.manager(cache=down, store=LoserStore(env.database_url), sleep=real_sleep)
    results: dict[str, object] = {}

    def fetch(name: str, manager) -> None:  # type: ignore[no-untyped-def]
        try:
            results[name] = manager.get_token("user-1").access_token
        except Exception as exc:
            results[name] = exc

    winner_thread = threading.Thread(target=fetch, args=("winner", winner))
    winner_thread.start()
    while not token_calls(rsps):  # the winner's refresh is at Sonos first
        threading.Event().wait(0.005)
    fetch("loser", loser)
    winner_thread.join()
    assert results == {"winner": "access-MARKER-winner", "loser": "access-MARKER-winner"}
    assert stored(env).token_status is TokenStatus.ACTIVE
    assert env.notifier.events == []
