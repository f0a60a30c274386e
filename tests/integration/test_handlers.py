"""The six Lambda handlers end to end: real Redis and Postgres, SSM through moto, Sonos through `responses`.

Each handler is loaded from its file (functions/<name>/app.py) as a container would
load it, and invoked with the sample events in events/ and with broken ones. Every
test ends with a scan of everything the service logged and printed for each secret
the test used.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.client
import psycopg
import pytest
import redis
import responses
from aws_lambda_powertools.metrics.provider.cold_start import reset_cold_start_flag
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws

from tests.support.answer_checks import ERROR_STATUS, refresher_summary
from tests.support.handlers import (
    LambdaContextStub,
    api_event,
    captured_service_logs,
    function_for_event,
    handler_environment,
    header,
    load_event,
    load_handler,
    sample_event_files,
)
from tests.support.secrets_scan import find_leaks
from token_manager import runtime
from token_manager.crypto import KeyRing
from token_manager.key_rotation import run_key_rotation
from token_manager.store.postgres import PostgresTokenStore

pytestmark = pytest.mark.integration

USER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"  # the user every sample event names
SAMPLE_HOUSEHOLD = "Sonos_tQa5Qk1Wc7tLxG2mYh8N3pZbE4rV.D9fJ0sKuI6oT1wX"  # token_fetch_household_direct.json
PRIMARY_HOUSEHOLD = "Sonos_Primary0000000000000.Household000001"
HOUSEHOLDS = (PRIMARY_HOUSEHOLD, SAMPLE_HOUSEHOLD)

CLIENT_ID = "client-id-handlers"
CLIENT_SECRET = "client-secret-MARKER-handlers-7f3a"
AUTH_BASE = "https://api.sonos.test"
CONTROL_BASE = "https://control.sonos.test/control/api/v1"
TOKEN_URL = AUTH_BASE + "/login/v3/oauth/access"
HOUSEHOLDS_URL = CONTROL_BASE + "/households"
REVOKE_URL = AUTH_BASE + "/login/v3/oauth/revoke"
REDIRECT_URI = "http://127.0.0.1:3000/sonos/oauth/callback"  # what events/oauth_initiate_api.json asks for
ACCESS = "access-MARKER-handlers-0001"
REFRESH = "refresh-MARKER-handlers-0001"
CODE = "code-MARKER-handlers-0001"
SUCCESS_URL = "https://app.example.test/sonos/linked"
FAILURE_URL = "https://app.example.test/sonos/failed?from=sonos"
SSM_PREFIX = "/storytailor-dev/"

ERROR_CODES_AND_STATUSES = {**ERROR_STATUS, "internal_error": 500}

# setting's environment variable -> SSM name under /storytailor-dev/
SSM_NAMES = {
    "SONOS_CLIENT_ID": "sonos/client-id",
    "SONOS_CLIENT_SECRET": "sonos/client-secret",
    "SONOS_REDIRECT_URI": "sonos/redirect-uri",
    "TOKEN_ENCRYPTION_KEYS": "sonos/token-encryption-keys",
    "REDIS_URL": "redis/url",
}


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """The services, the environment and the loaded handlers of one test."""

    monkeypatch: pytest.MonkeyPatch
    rsps: responses.RequestsMock
    database_url: str
    redis_url: str
    ring: KeyRing
    logs: Any
    secrets: set[str]
    aws_calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    ssm_down: bool = False
    handlers: dict[str, ModuleType] = field(default_factory=dict)
    warm_function: str | None = None

    # -- invoking ----------------------------------------------------------------------------

    def invoke(self, function: str, event: Any, context: LambdaContextStub | None = None) -> Any:
        """Invoke a function; each function runs in its own container, kept warm between
        consecutive invocations of the same function."""
        if function != self.warm_function:
            self.new_container()
            self.warm_function = function
        if function not in self.handlers:
            self.handlers[function] = load_handler(function)
        return self.handlers[function].lambda_handler(event, context or LambdaContextStub())

    def new_container(self) -> None:
        """What a fresh Lambda container has: nothing built, handler modules loaded anew."""
        runtime.reset_for_tests(sleep=self.sleeps.append)
        reset_cold_start_flag()  # type: ignore[no-untyped-call]
        self.handlers.clear()
        self.warm_function = None

    # -- Sonos ---------------------------------------------------------------------------------

    def sonos_token(
        self, access: str = ACCESS, refresh: str | None = REFRESH, expires_in: object = 86399, status: int = 200
    ) -> Any:
        body: dict[str, object] = {"access_token": access, "token_type": "Bearer", "expires_in": expires_in}
        if refresh is not None:
            body["refresh_token"] = refresh
            self.secrets.add(refresh)
        self.secrets.add(access)
        return self.rsps.add(responses.POST, TOKEN_URL, json=body, status=status)

    def sonos_households(self, households: tuple[str, ...] = HOUSEHOLDS) -> Any:
        return self.rsps.add(responses.GET, HOUSEHOLDS_URL, json={"households": [{"id": h} for h in households]})

    def token_requests(self) -> list[Any]:
        return [call for call in self.rsps.calls if call.request.url == TOKEN_URL]

    # -- linking -------------------------------------------------------------------------------

    def initiate(self, user_id: str = USER) -> str:
        answer = self.invoke("oauth_initiate", {"userId": user_id})
        assert "authorizationUrl" in answer, answer
        return str(answer["state"])

    def link(self, user_id: str = USER, *, expires_in: object = 86399, access: str = ACCESS) -> None:
        """The whole OAuth flow through the initiate and callback handlers."""
        state = self.initiate(user_id)
        token = self.sonos_token(access=access, expires_in=expires_in)
        households = self.sonos_households()
        answer = self.invoke("oauth_callback", callback_event(code=CODE, state=state))
        assert answer["statusCode"] == 200, answer
        self.rsps.remove(token)
        self.rsps.remove(households)
        self.rsps.calls.reset()

    # -- SSM -----------------------------------------------------------------------------------

    def move_to_ssm(self, *variables: str, values: dict[str, str] | None = None) -> None:
        """Empty these environment variables and store their values as SSM SecureStrings."""
        import os

        ssm = boto3.client("ssm")
        for variable in variables:
            value = (values or {}).get(variable, os.environ[variable])
            ssm.put_parameter(Name=SSM_PREFIX + SSM_NAMES[variable], Value=value, Type="SecureString")
            self.monkeypatch.setenv(variable, "")
        self.aws_calls.clear()

    def ssm_calls(self, operation: str) -> list[dict[str, Any]]:
        return [params for service, op, params in self.aws_calls if service == "ssm" and op == operation]

    # -- database ------------------------------------------------------------------------------

    def execute(self, statement: str, *params: object) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            connection.execute(statement, params)

    def row(self, user_id: str = USER) -> dict[str, Any] | None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            cursor = connection.execute(
                "select token_status, encryption_key_id from sonos_tokens where user_id = %s", (user_id,)
            )
            found = cursor.fetchone()
        return None if found is None else {"token_status": found[0], "encryption_key_id": found[1]}


@pytest.fixture
def world(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[World]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("truncate sonos_tokens")
    redis.Redis.from_url(redis_url).flushdb()
    ring = KeyRing.generate()
    environment = handler_environment(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        key_ring_json=ring.to_json(),
        database_url=database_url,
        redis_url=redis_url,
        auth_base_url=AUTH_BASE,
        control_base_url=CONTROL_BASE,
    )
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    secrets = {CLIENT_SECRET, ACCESS, REFRESH, CODE, ring.to_json()}
    for key in ring.keys.values():
        secrets.update({key.hex(), base64.b64encode(key).decode()})

    # mock_aws starts before `responses`: moto's own `responses` mock must not shadow the Sonos stubs.
    with (
        mock_aws(),
        responses.RequestsMock(assert_all_requests_are_fired=False) as rsps,
        captured_service_logs() as logs,
    ):
        state = World(monkeypatch, rsps, database_url, redis_url, ring, logs, secrets)
        state.new_container()
        _record_aws_calls(state, monkeypatch)
        yield state
        runtime.reset_for_tests()
    printed = capsys.readouterr()
    leaks = find_leaks(state.secrets, [logs.getvalue(), printed.out, printed.err])
    assert leaks == [], f"secrets found in the service's output: {leaks}"


def _record_aws_calls(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AWS API call any client makes, and SSM made unreachable on demand."""
    original = botocore.client.BaseClient._make_api_call

    def recording(client: Any, operation: str, params: dict[str, Any]) -> Any:
        service = client.meta.service_model.service_name
        world.aws_calls.append((service, operation, dict(params)))
        if world.ssm_down and service == "ssm":
            raise EndpointConnectionError(endpoint_url="https://ssm.us-east-1.amazonaws.com/")
        return original(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)


# --------------------------------------------------------------------------- event helpers


def callback_event(**query: str) -> Any:
    return api_event("oauth_callback_api.json", query=query)


def body_of(answer: dict[str, Any]) -> Any:
    return json.loads(answer["body"])


def assert_api_error(answer: dict[str, Any], code: str) -> None:
    status = ERROR_CODES_AND_STATUSES[code]
    assert answer["statusCode"] == status, answer
    assert header(answer, "Content-Type") == "application/json"
    body = body_of(answer)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert "Traceback" not in answer["body"]


def assert_direct_error(answer: dict[str, Any], code: str) -> None:
    assert set(answer) == {"error"}, answer
    assert answer["error"] == {
        "code": code,
        "message": answer["error"]["message"],
        "status": ERROR_CODES_AND_STATUSES[code],
    }
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- sample events


def _expect_initiate_direct(world: World, answer: Any) -> None:
    assert set(answer) == {"authorizationUrl", "state", "expiresIn"}
    assert answer["expiresIn"] == 600
    url = urlsplit(answer["authorizationUrl"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == AUTH_BASE + "/login/v3/oauth"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query == {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "state": answer["state"],
        "scope": "playback-control-all",
        "redirect_uri": REDIRECT_URI,
    }


def _expect_initiate_api(world: World, answer: Any) -> None:
    assert answer["statusCode"] == 200
    assert header(answer, "Cache-Control") == "no-store"
    _expect_initiate_direct(world, body_of(answer))


def _expect_fetch_direct(world: World, answer: Any) -> None:
    assert answer["accessToken"] == ACCESS
    assert answer["householdId"] == PRIMARY_HOUSEHOLD
    assert answer["householdIds"] == list(HOUSEHOLDS)
    expires_at = datetime.fromisoformat(answer["expiresAt"].replace("Z", "+00:00"))
    assert answer["expiresAt"].endswith("Z")
    assert timedelta(hours=23) < expires_at - datetime.now(UTC) < timedelta(hours=24)


def _expect_fetch_api(world: World, answer: Any) -> None:
    assert answer["statusCode"] == 200
    assert header(answer, "Cache-Control") == "no-store"
    _expect_fetch_direct(world, body_of(answer))


def _expect_fetch_household(world: World, answer: Any) -> None:
    assert answer["accessToken"] == ACCESS
    assert answer["householdId"] == SAMPLE_HOUSEHOLD


def _expect_revoke_api(world: World, answer: Any) -> None:
    assert answer["statusCode"] == 200
    assert body_of(answer) == {"revoked": True, "providerRevoked": False}
    assert world.row() is None


def _expect_revoke_direct(world: World, answer: Any) -> None:
    assert answer == {"revoked": True, "providerRevoked": False}
    assert world.row() is None


def _expect_refresher(world: World, answer: Any) -> None:
    assert answer == refresher_summary()


def _expect_rotation(world: World, answer: Any) -> None:
    assert answer["previousKeyId"] == world.ring.active_key_id
    assert answer["activeKeyId"] != world.ring.active_key_id
    assert answer["reencrypted"] == 1
    row = world.row()
    assert row is not None
    assert row["encryption_key_id"] == answer["activeKeyId"]


def _expect_expired_link_page(world: World, answer: Any) -> None:
    # The sample's state was never issued here: the browser is told the link expired.
    assert answer["statusCode"] == 400
    assert "This link has expired" in answer["body"]
    assert world.token_requests() == []


SAMPLE_EXPECTATIONS: dict[str, Callable[[World, Any], None]] = {
    "oauth_initiate_direct.json": _expect_initiate_direct,
    "oauth_initiate_api.json": _expect_initiate_api,
    "oauth_callback_api.json": _expect_expired_link_page,
    "oauth_callback_denied_api.json": _expect_expired_link_page,
    "token_fetch_direct.json": _expect_fetch_direct,
    "token_fetch_api.json": _expect_fetch_api,
    "token_fetch_household_direct.json": _expect_fetch_household,
    "token_revoke_api.json": _expect_revoke_api,
    "token_revoke_direct.json": _expect_revoke_direct,
    "token_refresher_schedule.json": _expect_refresher,
    "key_rotation_direct.json": _expect_rotation,
    "key_rotation_schedule.json": _expect_rotation,
}


def test_every_sample_event_has_an_expectation() -> None:
    assert sorted(SAMPLE_EXPECTATIONS) == sample_event_files()


@pytest.mark.parametrize("file_name", sorted(SAMPLE_EXPECTATIONS))
def test_sample_event_answers_through_its_handler(world: World, file_name: str) -> None:
    if file_name.startswith("key_rotation"):
        world.move_to_ssm("TOKEN_ENCRYPTION_KEYS")  # a ring in the environment cannot be rotated
    world.link()
    answer = world.invoke(function_for_event(file_name), load_event(file_name))
    SAMPLE_EXPECTATIONS[file_name](world, answer)


def test_sample_callback_events_complete_and_deny_a_flow_they_belong_to(world: World) -> None:
    state = world.initiate()
    world.sonos_token()
    world.sonos_households()
    event = load_event("oauth_callback_api.json")
    event["queryStringParameters"]["state"] = state
    event["multiValueQueryStringParameters"]["state"] = [state]
    linked = world.invoke("oauth_callback", event)
    assert linked["statusCode"] == 200
    assert "Sonos is connected" in linked["body"]

    denied_state = world.initiate("user-who-says-no")
    event = load_event("oauth_callback_denied_api.json")
    event["queryStringParameters"]["state"] = denied_state
    event["multiValueQueryStringParameters"]["state"] = [denied_state]
    denied = world.invoke("oauth_callback", event)
    assert denied["statusCode"] == 400
    assert "Sonos was not connected" in denied["body"]
    assert len(world.token_requests()) == 1  # the denial made no token request
    assert world.row("user-who-says-no") is None


def test_revoke_over_api_takes_the_user_from_a_json_body(world: World) -> None:
    world.link()
    answer = world.invoke("token_revoke", api_event("token_revoke_api.json", query=None, body={"userId": USER}))
    assert answer["statusCode"] == 200
    assert body_of(answer) == {"revoked": True, "providerRevoked": False}
    again = world.invoke("token_revoke", api_event("token_revoke_api.json", query=None, body={"userId": USER}))
    assert body_of(again) == {"revoked": False, "providerRevoked": False}  # idempotent


def test_revoke_reports_provider_revocation_when_a_revoke_url_is_configured(world: World) -> None:
    world.monkeypatch.setenv("SONOS_REVOKE_URL", REVOKE_URL)
    world.link()
    world.rsps.add(responses.POST, REVOKE_URL, status=200)
    assert world.invoke("token_revoke", load_event("token_revoke_direct.json")) == {
        "revoked": True,
        "providerRevoked": True,
    }


# --------------------------------------------------------------------------- every error code


def test_invalid_request_direct_and_api(world: World) -> None:
    assert_direct_error(world.invoke("token_fetch", {}), "invalid_request")
    assert_api_error(world.invoke("token_fetch", api_event("token_fetch_api.json", query=None)), "invalid_request")


def test_invalid_redirect_uri_direct_and_api(world: World) -> None:
    request = {"userId": USER, "redirectUri": "https://evil.test/cb"}
    assert_direct_error(world.invoke("oauth_initiate", request), "invalid_redirect_uri")
    answer = world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body=request))
    assert_api_error(answer, "invalid_redirect_uri")


def test_invalid_state_and_access_denied_reach_the_browser_as_failure_redirects(world: World) -> None:
    world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", FAILURE_URL)
    unknown = world.invoke("oauth_callback", callback_event(code=CODE, state="never-issued-state"))
    assert unknown["statusCode"] == 302
    assert header(unknown, "Location") == FAILURE_URL + "&error=invalid_state"
    state = world.initiate()
    denied = world.invoke("oauth_callback", callback_event(error="access_denied", state=state))
    assert header(denied, "Location") == FAILURE_URL + "&error=access_denied"
    assert world.token_requests() == []


def test_not_connected_direct_and_api(world: World) -> None:
    assert_direct_error(world.invoke("token_fetch", {"userId": "nobody"}), "not_connected")
    answer = world.invoke("token_fetch", api_event("token_fetch_api.json", query={"userId": "nobody"}))
    assert_api_error(answer, "not_connected")


def test_household_not_linked_direct_and_api(world: World) -> None:
    world.link()
    other = {"userId": USER, "householdId": "Sonos_NotThisAccount"}
    assert_direct_error(world.invoke("token_fetch", other), "household_not_linked")
    assert_api_error(
        world.invoke("token_fetch", api_event("token_fetch_api.json", query=other)), "household_not_linked"
    )


def test_reconnect_required_direct_and_api(world: World) -> None:
    world.link()
    world.execute("update sonos_tokens set token_status = 'expired' where user_id = %s", USER)
    redis.Redis.from_url(world.redis_url).flushdb()
    assert_direct_error(world.invoke("token_fetch", {"userId": USER}), "reconnect_required")
    assert_api_error(world.invoke("token_fetch", load_event("token_fetch_api.json")), "reconnect_required")
    assert world.token_requests() == []


def test_upstream_unavailable_when_an_expired_token_cannot_be_refreshed(world: World) -> None:
    world.link()
    world.execute("update sonos_tokens set expires_at = now() - interval '1 minute' where user_id = %s", USER)
    redis.Redis.from_url(world.redis_url).flushdb()
    world.rsps.add(responses.POST, TOKEN_URL, status=503)
    assert_direct_error(world.invoke("token_fetch", {"userId": USER}), "upstream_unavailable")
    assert_api_error(world.invoke("token_fetch", load_event("token_fetch_api.json")), "upstream_unavailable")
    assert len(world.token_requests()) == 6  # three attempts per call, with backoff sleeps recorded, not slept
    assert len(world.sleeps) >= 4
    assert world.row() == {"token_status": "active", "encryption_key_id": world.ring.active_key_id}


def test_storage_unavailable_when_redis_is_down_for_initiate(world: World) -> None:
    world.monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    assert_direct_error(world.invoke("oauth_initiate", {"userId": USER}), "storage_unavailable")
    answer = world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body={"userId": USER}))
    assert_api_error(answer, "storage_unavailable")


def test_configuration_error_when_sonos_rejects_the_client_c12(world: World) -> None:
    world.link()
    world.execute("update sonos_tokens set expires_at = now() - interval '1 second' where user_id = %s", USER)
    redis.Redis.from_url(world.redis_url).flushdb()
    world.rsps.add(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_client"})
    assert_direct_error(world.invoke("token_fetch", {"userId": USER}), "configuration_error")
    assert_api_error(world.invoke("token_fetch", load_event("token_fetch_api.json")), "configuration_error")
    assert world.row() == {"token_status": "active", "encryption_key_id": world.ring.active_key_id}


def test_internal_error_for_a_bug_logs_the_class_but_not_the_message(world: World) -> None:
    world.link()
    world.invoke("token_fetch", {"userId": USER})  # built and warm
    manager = runtime.get_manager()
    marker = "bug-MARKER-with-data-9c1e"
    world.secrets.add(marker)

    def broken(*_: object) -> None:
        raise RuntimeError(marker)

    world.monkeypatch.setattr(manager, "get_token", broken)
    direct = world.invoke("token_fetch", {"userId": USER})
    assert direct == {"error": {"code": "internal_error", "message": "Internal error.", "status": 500}}
    api = world.invoke("token_fetch", load_event("token_fetch_api.json"))
    assert api["statusCode"] == 500
    assert body_of(api) == {"error": {"code": "internal_error", "message": "Internal error."}}
    assert '"error":"RuntimeError"' in world.logs.getvalue()


def test_every_error_code_has_a_test_here() -> None:
    tested = {
        "invalid_request",
        "invalid_redirect_uri",
        "invalid_state",
        "access_denied",
        "not_connected",
        "household_not_linked",
        "reconnect_required",
        "upstream_unavailable",
        "storage_unavailable",
        "configuration_error",
        "internal_error",
    }
    from token_manager.errors import ALL_ERRORS

    assert {error.code for error in ALL_ERRORS} | {"internal_error"} == tested == set(ERROR_CODES_AND_STATUSES)
    assert all(ERROR_CODES_AND_STATUSES[error.code] == error.status for error in ALL_ERRORS)


# --------------------------------------------------------------------------- malformed input

LONG_ID = "u" * 257
LONG_URI = "https://example.test/" + "p" * 2048
NOT_UTF8 = base64.b64encode(b'{"userId": "\xff\xfe"}').decode()
INPUT_MARKER = "INPUT-MARKER-never-echoed"


MALFORMED_DIRECT = [
    pytest.param("token_fetch", {}, "userId", id="fetch-missing-user"),
    pytest.param("token_fetch", {"userId": 5}, "userId", id="fetch-user-not-string"),
    pytest.param("token_fetch", {"userId": ["a"]}, "userId", id="fetch-user-list"),
    pytest.param("token_fetch", {"userId": ""}, "userId", id="fetch-user-empty"),
    pytest.param("token_fetch", {"userId": LONG_ID + INPUT_MARKER}, "userId", id="fetch-user-too-long"),
    pytest.param("token_fetch", {"userId": USER, "householdId": 7}, "householdId", id="fetch-household-not-string"),
    pytest.param("token_fetch", {"userId": "has space " + INPUT_MARKER}, "userId", id="fetch-user-with-space"),
    pytest.param("token_fetch", ["not", "an", "object"], "payload", id="fetch-payload-list"),
    pytest.param("token_fetch", "just text", "payload", id="fetch-payload-string"),
    pytest.param("token_fetch", None, "payload", id="fetch-payload-null"),
    pytest.param("token_revoke", {"householdId": "x"}, "userId", id="revoke-missing-user"),
    pytest.param("token_revoke", {"userId": {"nested": INPUT_MARKER}}, "userId", id="revoke-user-object"),
    pytest.param("oauth_initiate", {}, "userId", id="initiate-missing-user"),
    pytest.param("oauth_initiate", {"userId": USER, "redirectUri": 42}, "redirectUri", id="initiate-uri-not-string"),
    pytest.param(
        "oauth_initiate", {"userId": USER, "redirectUri": LONG_URI}, "redirectUri", id="initiate-uri-too-long"
    ),
    pytest.param("oauth_callback", {"code": CODE, "state": "x"}, "API Gateway", id="callback-is-api-only"),
]


@pytest.mark.parametrize(("function", "payload", "named"), MALFORMED_DIRECT)
def test_malformed_direct_payload_answers_invalid_request_naming_the_field(
    world: World, function: str, payload: Any, named: str
) -> None:
    answer = world.invoke(function, payload)
    assert_direct_error(answer, "invalid_request")
    assert named in answer["error"]["message"]
    assert INPUT_MARKER not in json.dumps(answer)
    assert INPUT_MARKER not in world.logs.getvalue()


MALFORMED_API = [
    pytest.param("token_fetch", api_event("token_fetch_api.json", query=None), 400, id="fetch-no-query"),
    pytest.param("token_fetch", api_event("token_fetch_api.json", query={"userId": LONG_ID}), 400, id="fetch-long"),
    pytest.param("token_fetch", api_event("token_fetch_api.json", query={"userId": ""}), 400, id="fetch-empty"),
    pytest.param(
        "token_fetch",
        api_event("token_fetch_api.json", query={"userId": USER, "householdId": ""}),
        400,
        id="fetch-empty-household",
    ),
    pytest.param("token_fetch", api_event("token_fetch_api.json", path="/sonos/nothing"), 404, id="unknown-route"),
    pytest.param("token_fetch", api_event("token_fetch_api.json", httpMethod="PUT"), 405, id="unknown-method"),
    pytest.param("token_fetch", api_event("token_fetch_api.json", httpMethod=None), 400, id="no-method"),
    pytest.param("token_revoke", api_event("token_revoke_api.json", query=None), 400, id="revoke-no-user"),
    pytest.param(
        "token_revoke", api_event("token_revoke_api.json", query=None, body="{not json"), 400, id="revoke-bad-json"
    ),
    pytest.param(
        "token_revoke", api_event("token_revoke_api.json", query=None, body="[1, 2]"), 400, id="revoke-json-list"
    ),
    pytest.param(
        "token_revoke",
        api_event("token_revoke_api.json", query=None, body={"userId": 12345}),
        400,
        id="revoke-user-not-string",
    ),
    pytest.param("token_revoke", api_event("token_revoke_api.json", httpMethod="GET"), 405, id="revoke-get"),
    pytest.param("oauth_initiate", api_event("oauth_initiate_api.json", body=None), 400, id="initiate-no-body"),
    pytest.param("oauth_initiate", api_event("oauth_initiate_api.json", body="userId=x"), 400, id="initiate-not-json"),
    pytest.param(
        "oauth_initiate",
        api_event("oauth_initiate_api.json", body=NOT_UTF8, isBase64Encoded=True),
        400,
        id="initiate-not-utf8",
    ),
    pytest.param(
        "oauth_initiate",
        api_event("oauth_initiate_api.json", body="***not base64***", isBase64Encoded=True),
        400,
        id="initiate-bad-base64",
    ),
    pytest.param(
        "oauth_initiate", api_event("oauth_initiate_api.json", body="[" * 100_000), 400, id="initiate-deep-nesting"
    ),
    pytest.param(
        "oauth_initiate", api_event("oauth_initiate_api.json", body="9" * 5000), 400, id="initiate-huge-number"
    ),
    pytest.param(
        "oauth_initiate",
        api_event("oauth_initiate_api.json", body={"userId": 1, "redirectUri": INPUT_MARKER}),
        400,
        id="initiate-user-not-string",
    ),
    pytest.param(
        "oauth_initiate",
        api_event("oauth_initiate_api.json", body={"userId": LONG_ID + INPUT_MARKER}),
        400,
        id="initiate-user-too-long",
    ),
    pytest.param(
        "oauth_initiate",
        api_event(
            "oauth_initiate_api.json",
            body=json.dumps({"userId": USER}),
            headers={"Content-Type": "text/plain"},
            multiValueHeaders={"Content-Type": ["text/plain"]},
        ),
        400,
        id="initiate-wrong-content-type",
    ),
    pytest.param(
        "oauth_initiate", api_event("oauth_initiate_api.json", path="/sonos/token"), 404, id="initiate-elsewhere"
    ),
]


@pytest.mark.parametrize(("function", "event", "status"), MALFORMED_API)
def test_malformed_api_request_answers_4xx_in_our_error_shape(
    world: World, function: str, event: Any, status: int
) -> None:
    answer = world.invoke(function, json.loads(json.dumps(event)))
    assert answer["statusCode"] == status, answer
    body = body_of(answer)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    if status == 400:
        assert body["error"]["code"] == "invalid_request"
    if status == 405:
        assert header(answer, "Allow") in ("GET", "DELETE", "POST")
    assert INPUT_MARKER not in answer["body"]
    assert INPUT_MARKER not in world.logs.getvalue()


def test_api_validation_names_the_query_field(world: World) -> None:
    answer = world.invoke("token_fetch", api_event("token_fetch_api.json", query={"userId": LONG_ID}))
    assert body_of(answer)["error"]["message"] == "userId must be at most 256 characters."
    answer = world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body={"redirectUri": REDIRECT_URI}))
    assert body_of(answer)["error"]["message"] == "userId is required."


def test_unknown_fields_are_ignored(world: World) -> None:
    world.link()
    answer = world.invoke("token_fetch", {"userId": USER, "extra": {"anything": [1, 2]}, "correlationId": "c-1"})
    assert answer["accessToken"] == ACCESS


@pytest.mark.parametrize(
    ("query", "page"),
    [
        pytest.param({"code": CODE, "state": "s" * 129}, "This link has expired", id="state-too-long"),
        pytest.param({"code": CODE, "state": "not a valid state!"}, "This link has expired", id="state-bad-chars"),
        pytest.param({"code": CODE}, "This link has expired", id="no-state"),
        pytest.param({}, "This link has expired", id="no-query"),
    ],
)
def test_malformed_callback_answers_the_browser_without_a_token_request(
    world: World, query: dict[str, str], page: str
) -> None:
    answer = world.invoke("oauth_callback", callback_event(**query))
    assert answer["statusCode"] == 400
    assert page in answer["body"]
    assert world.token_requests() == []


def test_callback_with_an_issued_state_but_no_code_is_invalid_request(world: World) -> None:
    state = world.initiate()
    answer = world.invoke("oauth_callback", callback_event(state=state, code="c" * 2049))
    assert answer["statusCode"] == 400
    assert "Sonos could not be connected" in answer["body"]


# --------------------------------------------------------------------------- the callback


def _assert_browser_safe(answer: dict[str, Any]) -> None:
    assert header(answer, "Cache-Control") == "no-store"
    assert header(answer, "Referrer-Policy") == "no-referrer"
    visible = json.dumps(answer)
    for secret in (ACCESS, REFRESH, CODE, CLIENT_SECRET):
        assert secret not in visible


def test_callback_success_page_is_self_contained(world: World) -> None:
    state = world.initiate()
    world.sonos_token()
    world.sonos_households()
    answer = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    assert answer["statusCode"] == 200
    assert header(answer, "Content-Type") == "text/html; charset=utf-8"
    csp = header(answer, "Content-Security-Policy") or ""
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "Sonos is connected" in answer["body"]
    assert "<script" not in answer["body"]
    assert "http" not in answer["body"]
    _assert_browser_safe(answer)


def test_callback_redirects_to_the_success_url_exactly(world: World) -> None:
    world.monkeypatch.setenv("SONOS_LINK_SUCCESS_URL", SUCCESS_URL)
    world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", FAILURE_URL)
    state = world.initiate()
    world.sonos_token()
    world.sonos_households()
    answer = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    assert answer["statusCode"] == 302
    assert header(answer, "Location") == SUCCESS_URL
    assert answer["body"] == ""
    _assert_browser_safe(answer)


def test_callback_failure_redirect_appends_only_the_error_code(world: World) -> None:
    world.monkeypatch.setenv("SONOS_LINK_FAILURE_URL", "https://app.example.test/sonos/failed")
    state = world.initiate()
    world.rsps.add(responses.POST, TOKEN_URL, status=503)
    answer = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    assert answer["statusCode"] == 302
    assert header(answer, "Location") == "https://app.example.test/sonos/failed?error=upstream_unavailable"
    _assert_browser_safe(answer)


@pytest.mark.parametrize(
    ("sonos_status", "sonos_body", "status", "page"),
    [
        pytest.param(503, {}, 503, "Reload this page in a moment", id="sonos-down"),
        pytest.param(400, {"error": "invalid_grant"}, 400, "This link has expired", id="code-already-used"),
        pytest.param(401, {"error": "invalid_client"}, 500, "Sonos could not be connected", id="bad-client"),
    ],
)
def test_callback_error_pages(
    world: World, sonos_status: int, sonos_body: dict[str, str], status: int, page: str
) -> None:
    state = world.initiate()
    world.rsps.add(responses.POST, TOKEN_URL, status=sonos_status, json=sonos_body)
    answer = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    assert answer["statusCode"] == status
    assert page in answer["body"]
    _assert_browser_safe(answer)
    assert world.row() is None


def test_callback_denied_page(world: World) -> None:
    state = world.initiate()
    answer = world.invoke("oauth_callback", callback_event(error="access_denied", state=state))
    assert answer["statusCode"] == 400
    assert "Sonos was not connected" in answer["body"]
    _assert_browser_safe(answer)


def test_repeated_callback_answers_success_twice_with_one_code_exchange_c7(world: World) -> None:
    state = world.initiate()
    world.sonos_token()
    world.sonos_households()
    first = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    world.new_container()  # the retry may land in another container
    second = world.invoke("oauth_callback", callback_event(code=CODE, state=state))
    assert first["statusCode"] == second["statusCode"] == 200
    assert "Sonos is connected" in second["body"]
    assert len(world.token_requests()) == 1


# --------------------------------------------------------------------------- configuration


def test_settings_come_from_ssm_in_one_batched_decrypting_call(world: World) -> None:
    world.move_to_ssm(*SSM_NAMES)
    world.link()
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS
    calls = world.ssm_calls("GetParameters")
    assert len(calls) == 3  # one per container: initiate, callback and fetch each started cold
    for call in calls:
        assert call["WithDecryption"] is True
        assert sorted(call["Names"]) == sorted(SSM_PREFIX + name for name in SSM_NAMES.values())
    assert world.ssm_calls("GetParameter") == []


def test_a_warm_container_reads_ssm_once(world: World) -> None:
    world.move_to_ssm(*SSM_NAMES)
    world.link()
    world.aws_calls.clear()
    for _ in range(3):
        assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS
    assert len(world.ssm_calls("GetParameters")) == 1


def test_a_non_empty_environment_variable_overrides_ssm(world: World) -> None:
    world.move_to_ssm("SONOS_CLIENT_SECRET", "REDIS_URL")
    boto3.client("ssm").put_parameter(
        Name=SSM_PREFIX + SSM_NAMES["SONOS_CLIENT_ID"], Value="client-id-from-ssm", Type="SecureString"
    )
    world.monkeypatch.setenv("SONOS_CLIENT_ID", "client-id-from-env")
    world.aws_calls.clear()
    answer = world.invoke("oauth_initiate", {"userId": USER})
    assert "client_id=client-id-from-env" in answer["authorizationUrl"]
    (call,) = world.ssm_calls("GetParameters")
    assert sorted(call["Names"]) == [SSM_PREFIX + "redis/url", SSM_PREFIX + "sonos/client-secret"]


def test_ssm_unreachable_at_cold_start_is_configuration_error_and_the_next_invocation_recovers(world: World) -> None:
    world.move_to_ssm(*SSM_NAMES)
    world.link()
    world.ssm_down = True
    down = world.invoke("token_fetch", {"userId": USER})
    assert_direct_error(down, "configuration_error")
    assert down["error"]["message"] == "Could not read settings from SSM (EndpointConnectionError)."
    api = world.invoke("token_fetch", load_event("token_fetch_api.json"))
    assert_api_error(api, "configuration_error")
    world.ssm_down = False
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS  # same container


def test_bad_key_ring_in_the_environment_names_the_setting_without_echoing_it(world: World) -> None:
    world.link()
    bad = '{"active": "k1", "keys": {"k1": "c2hvcnQtS0VZLU1BUktFUg=="}}'  # base64 of "short-KEY-MARKER"
    world.secrets.update({bad, "c2hvcnQtS0VZLU1BUktFUg=="})
    world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", bad)
    answer = world.invoke("token_fetch", {"userId": USER})
    assert answer == {
        "error": {
            "code": "configuration_error",
            "message": "TOKEN_ENCRYPTION_KEYS is not a usable key ring.",
            "status": 500,
        }
    }
    world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", world.ring.to_json())
    # Fixed: the same container builds now (the failure was not cached).
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS


def test_bad_key_ring_in_ssm_names_the_parameter(world: World) -> None:
    world.move_to_ssm("TOKEN_ENCRYPTION_KEYS", values={"TOKEN_ENCRYPTION_KEYS": "not json at all MARKER-ring"})
    world.secrets.add("not json at all MARKER-ring")
    answer = world.invoke("oauth_initiate", load_event("oauth_initiate_api.json"))
    assert_api_error(answer, "configuration_error")
    assert body_of(answer)["error"]["message"] == (
        "SSM /storytailor-dev/sonos/token-encryption-keys is not a usable key ring."
    )


def test_missing_setting_names_the_variable_and_the_parameter(world: World) -> None:
    world.monkeypatch.setenv("SONOS_CLIENT_ID", "")
    answer = world.invoke("token_fetch", {"userId": USER})
    assert answer["error"]["message"] == "Missing setting SONOS_CLIENT_ID or SSM /storytailor-dev/sonos/client-id."
    assert answer["error"]["status"] == 500


# --------------------------------------------------------------------------- scheduled functions


def test_refresher_refreshes_a_grant_due_before_the_next_run(world: World) -> None:
    world.link(expires_in=500)
    world.sonos_token(access="access-MARKER-refreshed-0002", refresh=None)
    summary = world.invoke("token_refresher", load_event("token_refresher_schedule.json"))
    assert summary == refresher_summary(scanned=1, refreshed=1)
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == "access-MARKER-refreshed-0002"


def test_refresher_starts_nothing_when_the_invocation_is_out_of_time(world: World) -> None:
    world.link(expires_in=500)
    context = LambdaContextStub(remaining_ms=1_000)
    summary = world.invoke("token_refresher", load_event("token_refresher_schedule.json"), context)
    assert summary["scanned"] == 1
    assert summary["skipped"] == 1
    assert summary["refreshed"] == 0
    assert world.token_requests() == []


def test_key_rotation_writes_the_ring_to_ssm_and_fetch_keeps_working(world: World) -> None:
    world.move_to_ssm("TOKEN_ENCRYPTION_KEYS")
    world.link()
    answer = world.invoke("key_rotation", load_event("key_rotation_schedule.json"))
    (put,) = world.ssm_calls("PutParameter")
    assert put["Name"] == SSM_PREFIX + "sonos/token-encryption-keys"
    assert put["Type"] == "SecureString"
    assert put["Overwrite"] is True
    stored = boto3.client("ssm").get_parameter(Name=put["Name"], WithDecryption=True)["Parameter"]
    assert stored["Type"] == "SecureString"
    new_ring = KeyRing.from_json(stored["Value"])
    world.secrets.update(base64.b64encode(key).decode() for key in new_ring.keys.values())
    assert new_ring.active_key_id == answer["activeKeyId"]
    assert world.ring.active_key_id in new_ring.keys  # the previous key waits for the next rotation

    world.new_container()
    redis.Redis.from_url(world.redis_url).flushdb()
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS


def test_a_second_rotation_in_a_warm_container_starts_from_the_ring_the_first_wrote(world: World) -> None:
    # A scheduler retry lands in the same container minutes later: it must not rotate
    # from a cached ring, which would drop the key the first run moved every row to.
    world.move_to_ssm("TOKEN_ENCRYPTION_KEYS")
    world.link()
    first = world.invoke("key_rotation", load_event("key_rotation_schedule.json"))
    second = world.invoke("key_rotation", load_event("key_rotation_schedule.json"))
    assert second["previousKeyId"] == first["activeKeyId"]
    assert (second["reencrypted"], second["failed"]) == (1, 0)
    stored = boto3.client("ssm").get_parameter(
        Name=SSM_PREFIX + SSM_NAMES["TOKEN_ENCRYPTION_KEYS"], WithDecryption=True
    )
    ring = KeyRing.from_json(stored["Parameter"]["Value"])
    world.secrets.update(base64.b64encode(key).decode() for key in ring.keys.values())
    assert {first["activeKeyId"], second["activeKeyId"]} <= set(ring.keys)
    redis.Redis.from_url(world.redis_url).flushdb()
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS


def test_a_warm_fetch_container_reloads_a_ring_rotated_elsewhere(world: World) -> None:
    world.move_to_ssm("TOKEN_ENCRYPTION_KEYS")
    world.link()
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS  # warm, ring cached
    ssm = boto3.client("ssm")
    name = SSM_PREFIX + SSM_NAMES["TOKEN_ENCRYPTION_KEYS"]

    def persist(ring: KeyRing) -> None:
        world.secrets.update(base64.b64encode(key).decode() for key in ring.keys.values())
        ssm.put_parameter(Name=name, Value=ring.to_json(), Type="SecureString", Overwrite=True)

    store = PostgresTokenStore(world.database_url)
    try:
        report = run_key_rotation(store, world.ring, persist_ring=persist)  # "another container" rotates
    finally:
        store.close()
    assert report["reencrypted"] == 1
    redis.Redis.from_url(world.redis_url).flushdb()
    assert world.invoke("token_fetch", {"userId": USER})["accessToken"] == ACCESS  # same warm container


def test_key_rotation_passes_the_configured_kms_key(world: World) -> None:
    world.move_to_ssm("TOKEN_ENCRYPTION_KEYS")
    world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS_KMS_KEY_ID", "alias/aws/ssm")
    world.invoke("key_rotation", load_event("key_rotation_direct.json"))
    assert {call["KeyId"] for call in world.ssm_calls("PutParameter")} == {"alias/aws/ssm"}


def test_key_rotation_refuses_a_ring_set_in_the_environment(world: World) -> None:
    world.link()
    answer = world.invoke("key_rotation", load_event("key_rotation_direct.json"))
    assert_direct_error(answer, "configuration_error")
    assert "TOKEN_ENCRYPTION_KEYS is set in the environment" in answer["error"]["message"]
    assert world.ssm_calls("PutParameter") == []
    assert world.row() == {"token_status": "active", "encryption_key_id": world.ring.active_key_id}


# --------------------------------------------------------------------------- observability


def _log_lines(world: World) -> list[dict[str, Any]]:
    return [json.loads(line) for line in world.logs.getvalue().splitlines() if line.startswith("{")]


def test_logs_carry_the_api_request_id_and_the_router_correlation_id(world: World) -> None:
    world.invoke("token_fetch", load_event("token_fetch_api.json"))
    world.invoke("token_fetch", load_event("token_fetch_direct.json"))
    ids = {line.get("correlation_id") for line in _log_lines(world) if line.get("message") == "request refused"}
    assert ids == {"e2b7d9a4-1c6f-4a83-b5e0-9d3c7f2a8b16", "req-01JEXAMPLE7Q2Z9W3XA5B8C4D6"}


def test_layer_logs_are_structured_json_with_the_lambda_context(world: World) -> None:
    world.link()
    linked = [line for line in _log_lines(world) if line.get("message") == "sonos account linked"]
    assert linked
    assert linked[0]["service"] == "sonos-token-service"
    assert linked[0]["function_name"] == "sonos-token-service-test"
    assert linked[0]["name"] == "token_manager.manager"


def test_metrics_record_cold_start_fetch_latency_and_errors(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    world.link()
    world.invoke("token_fetch", {"userId": USER})
    world.invoke("token_fetch", {"userId": "nobody"})
    printed = capsys.readouterr().out
    blobs = [json.loads(line) for line in printed.splitlines() if line.startswith('{"_aws"')]
    names = {metric["Name"] for blob in blobs for d in blob["_aws"]["CloudWatchMetrics"] for metric in d["Metrics"]}
    assert {"ColdStart", "FetchLatency", "Errors", "GrantLinked", "CacheMiss"} <= names
    errors = [blob for blob in blobs if "Errors" in blob]
    assert [blob["ErrorCode"] for blob in errors] == ["not_connected"]
    print(printed)  # give the output back to the fixture's secret scan
