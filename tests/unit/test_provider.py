"""The Sonos HTTP client against `responses`: requests sent, retries, classification, parsing, secrecy."""

from __future__ import annotations

import base64
import json
import logging
import random as stdlib_random
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter

from token_manager._backoff import full_jitter_delay, retry_after_seconds
from token_manager.errors import ConfigurationError
from token_manager.provider import (
    Operation,
    Outcome,
    SonosClient,
    SonosClientConfig,
    SonosClientRejected,
    SonosError,
    SonosGrantRejected,
    SonosInvalidResponse,
    SonosUnavailable,
    TokenResponse,
    classify,
)

# Distinctive markers: if any of them shows up in a message, repr or log line, a secret leaked.
CLIENT_ID = "client-id-0451"
CLIENT_SECRET = "SECRET-MARKER-9c1f-client-secret"
ACCESS_TOKEN = "ACCESS-MARKER-71d2-access-token"
REFRESH_TOKEN = "REFRESH-MARKER-5e8b-refresh-token"
NEW_REFRESH_TOKEN = "REFRESH-MARKER-ROTATED-33aa"
CODE = "CODE-MARKER-a4c7-authorization-code"
SECRETS = (CLIENT_SECRET, ACCESS_TOKEN, REFRESH_TOKEN, NEW_REFRESH_TOKEN, CODE)

AUTH_BASE = "https://auth.sonos.test"
CONTROL_BASE = "https://control.sonos.test/control/api/v1"
TOKEN_URL = f"{AUTH_BASE}/login/v3/oauth/access"
HOUSEHOLDS_URL = f"{CONTROL_BASE}/households"
REVOKE_URL = f"{AUTH_BASE}/login/v3/oauth/revoke"
REDIRECT_URI = "https://example.test/sonos/callback/"


def token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": ACCESS_TOKEN,
        "token_type": "Bearer",
        "refresh_token": NEW_REFRESH_TOKEN,
        "expires_in": 86399,
        "scope": "playback-control-all",
    }
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not _ABSENT}


_ABSENT: Any = object()


class FixedRandom:
    """Stands in for random.random: returns the given values in turn, repeating the last one."""

    def __init__(self, *values: float) -> None:
        self._values = list(values)

    def __call__(self) -> float:
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def config() -> SonosClientConfig:
    return SonosClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        auth_base_url=AUTH_BASE,
        control_base_url=CONTROL_BASE,
        revoke_url=REVOKE_URL,
    )


@pytest.fixture
def make_client(config: SonosClientConfig, sleeps: list[float]) -> Callable[..., SonosClient]:
    def make(random: Callable[[], float] | None = None, **overrides: Any) -> SonosClient:
        settings = {**config.__dict__, **overrides}
        # random() == 1.0 makes each jittered sleep the full window, so tests can name the value.
        return SonosClient(SonosClientConfig(**settings), sleep=sleeps.append, random=random or FixedRandom(1.0))

    return make


@pytest.fixture
def client(make_client: Callable[..., SonosClient]) -> SonosClient:
    return make_client()


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def basic_credentials(call: Any) -> str:
    scheme, _, encoded = call.request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded).decode()


def timeout_of(call: Any) -> Any:
    # `responses` records the keyword arguments the adapter was sent, timeout among them.
    return call.request.req_kwargs["timeout"]


def form(call: Any) -> dict[str, list[str]]:
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    return parse_qs(call.request.body, keep_blank_values=True, strict_parsing=True)


# --------------------------------------------------------------------------- requests as sent


def test_exchange_code_posts_form_with_basic_client_auth_and_explicit_timeouts(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, json=token_body())

    token = client.exchange_code(CODE, REDIRECT_URI)

    assert token.access_token == ACCESS_TOKEN
    assert token.refresh_token == NEW_REFRESH_TOKEN
    assert token.expires_in == 86399
    assert token.token_type == "Bearer"
    assert token.scope == "playback-control-all"
    assert len(rsps.calls) == 1
    call = rsps.calls[0]
    assert basic_credentials(call) == f"{CLIENT_ID}:{CLIENT_SECRET}"
    assert form(call) == {"grant_type": ["authorization_code"], "code": [CODE], "redirect_uri": [REDIRECT_URI]}
    assert timeout_of(call) == (3.05, 10.0)


def test_refresh_posts_refresh_grant_with_basic_client_auth(client: SonosClient, rsps: responses.RequestsMock) -> None:
    rsps.post(TOKEN_URL, json=token_body())

    token = client.refresh(REFRESH_TOKEN)

    assert token.access_token == ACCESS_TOKEN
    assert token.refresh_token == NEW_REFRESH_TOKEN
    assert len(rsps.calls) == 1
    assert basic_credentials(rsps.calls[0]) == f"{CLIENT_ID}:{CLIENT_SECRET}"
    assert form(rsps.calls[0]) == {"grant_type": ["refresh_token"], "refresh_token": [REFRESH_TOKEN]}
    assert timeout_of(rsps.calls[0]) == (3.05, 10.0)


def test_c9_authorize_url_carries_byte_identical_redirect_uri_with_trailing_slash(client: SonosClient) -> None:
    url = client.authorize_url(state="state-123", redirect_uri=REDIRECT_URI)

    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{AUTH_BASE}/login/v3/oauth"
    assert parse_qs(parts.query, strict_parsing=True) == {
        "client_id": [CLIENT_ID],
        "response_type": ["code"],
        "state": ["state-123"],
        "scope": ["playback-control-all"],
        "redirect_uri": [REDIRECT_URI],
    }
    # Fully percent-encoded, so no proxy or browser can normalise the trailing slash away.
    assert "redirect_uri=https%3A%2F%2Fexample.test%2Fsonos%2Fcallback%2F" in parts.query
    assert CLIENT_SECRET not in url


def test_authorize_url_uses_configured_scope(make_client: Callable[..., SonosClient]) -> None:
    url = make_client(scope="playback-control-all extra-scope").authorize_url(state="s", redirect_uri=REDIRECT_URI)

    assert parse_qs(urlsplit(url).query)["scope"] == ["playback-control-all extra-scope"]


def test_c9_exchange_carries_byte_identical_redirect_uri_with_trailing_slash(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, json=token_body())

    client.exchange_code(CODE, REDIRECT_URI)

    assert form(rsps.calls[0])["redirect_uri"] == [REDIRECT_URI]


def test_default_session_never_retries_inside_urllib3(config: SonosClientConfig) -> None:
    client = SonosClient(config)
    adapter = client._session.get_adapter(TOKEN_URL)
    assert isinstance(adapter, HTTPAdapter)

    assert adapter.max_retries.total == 0
    assert adapter.max_retries.redirect == 0
    client.close()


def test_injected_session_carries_the_requests(config: SonosClientConfig, rsps: responses.RequestsMock) -> None:
    session = requests.Session()
    session.headers["X-Shared-Session"] = "yes"
    rsps.post(TOKEN_URL, json=token_body())

    SonosClient(config, session=session, sleep=lambda _: None).refresh(REFRESH_TOKEN)

    assert rsps.calls[0].request.headers["X-Shared-Session"] == "yes"


def test_redirect_from_token_endpoint_is_not_followed_and_is_a_configuration_error(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, status=302, headers={"Location": "https://elsewhere.test/steal"})

    with pytest.raises(SonosClientRejected):
        client.refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 1


# --------------------------------------------------------------------------- token response parsing


def test_c1_refresh_retries_once_after_503_then_succeeds(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=503)
    rsps.post(TOKEN_URL, json=token_body())

    token = client.refresh(REFRESH_TOKEN)

    assert token.access_token == ACCESS_TOKEN
    assert len(rsps.calls) == 2
    assert sleeps == [0.25]


@pytest.mark.parametrize(
    "failure",
    [requests.exceptions.ReadTimeout("read timed out"), requests.exceptions.ConnectTimeout("connect timed out")],
    ids=["read-timeout", "connect-timeout"],
)
def test_c1_refresh_retries_once_after_timeout_then_succeeds(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float], failure: Exception
) -> None:
    rsps.post(TOKEN_URL, body=failure)
    rsps.post(TOKEN_URL, json=token_body())

    token = client.refresh(REFRESH_TOKEN)

    assert token.access_token == ACCESS_TOKEN
    assert len(rsps.calls) == 2
    assert len(sleeps) == 1


def test_c1_retry_is_logged_as_one_line_with_operation_attempt_kind_and_status(
    client: SonosClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    rsps.post(TOKEN_URL, status=503)
    rsps.post(TOKEN_URL, json=token_body())

    with caplog.at_level(logging.DEBUG, logger="token_manager"):
        client.refresh(REFRESH_TOKEN)

    records = [record for record in caplog.records if record.name == "token_manager.provider"]
    assert len(records) == 1
    (record,) = records
    assert record.levelno == logging.WARNING
    assert "\n" not in record.getMessage()
    fields = record.__dict__
    assert (fields["sonos_operation"], fields["attempt"], fields["failure_kind"], fields["http_status"]) == (
        "refresh",
        1,
        "transient",
        503,
    )
    assert "refresh" in record.getMessage()
    assert "503" in record.getMessage()


@pytest.mark.parametrize("refresh_token", [_ABSENT, "", None, "   "], ids=["absent", "empty", "null", "blank"])
def test_c3_refresh_without_new_refresh_token_parses_as_none(
    client: SonosClient, rsps: responses.RequestsMock, refresh_token: Any
) -> None:
    rsps.post(TOKEN_URL, json=token_body(refresh_token=refresh_token))

    token = client.refresh(REFRESH_TOKEN)

    assert token.refresh_token is None
    assert token.access_token == ACCESS_TOKEN
    assert token.expires_in == 86399


@pytest.mark.parametrize(
    ("expires_in", "seconds"),
    [("86399", 86399), (86399, 86399), (" 86399 ", 86399), (86399.0, 86399), ("86399.9", 86399), (1, 1)],
)
def test_c4_expires_in_number_or_numeric_string_parses_as_seconds(
    client: SonosClient, rsps: responses.RequestsMock, expires_in: Any, seconds: int
) -> None:
    rsps.post(TOKEN_URL, json=token_body(expires_in=expires_in))

    assert client.refresh(REFRESH_TOKEN).expires_in == seconds


@pytest.mark.parametrize(
    "expires_in",
    [_ABSENT, None, "", "soon", "1e5", "-5", 0, -1, 0.5, True, False, [86399], {"s": 1}, 10**12],
    ids=lambda value: "absent" if value is _ABSENT else repr(value),
)
def test_c5_exchange_without_usable_expires_in_is_invalid_response_after_one_request(
    client: SonosClient, rsps: responses.RequestsMock, expires_in: Any
) -> None:
    rsps.post(TOKEN_URL, json=token_body(expires_in=expires_in))

    with pytest.raises(SonosInvalidResponse, match="expires_in"):
        client.exchange_code(CODE, REDIRECT_URI)

    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    "access_token", [_ABSENT, None, "", "  ", 12345], ids=["absent", "null", "empty", "blank", "num"]
)
def test_token_response_without_access_token_is_invalid_response(
    client: SonosClient, rsps: responses.RequestsMock, access_token: Any
) -> None:
    rsps.post(TOKEN_URL, json=token_body(access_token=access_token))

    with pytest.raises(SonosInvalidResponse, match="access_token"):
        client.refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    ("body", "content_type"),
    [("<html>ok</html>", "text/html"), ("", "application/json"), ('["access_token"]', "application/json")],
    ids=["html", "empty", "json-list"],
)
def test_token_response_that_is_not_a_json_object_is_invalid_response(
    client: SonosClient, rsps: responses.RequestsMock, body: str, content_type: str
) -> None:
    rsps.post(TOKEN_URL, body=body, content_type=content_type)

    with pytest.raises(SonosInvalidResponse):
        client.refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 1


def test_token_response_ignores_extra_fields_and_tolerates_odd_informational_ones() -> None:
    token = TokenResponse.model_validate(
        token_body(token_type=None, scope=["not", "a", "string"], household_id="Sonos_x", resource_owner="me")
    )

    assert token.token_type == "Bearer"
    assert token.scope is None
    assert not hasattr(token, "household_id")


def test_token_response_repr_and_str_hide_token_values() -> None:
    token = TokenResponse.model_validate(token_body())

    for text in (repr(token), str(token), f"{token}", f"{token!r}"):
        assert ACCESS_TOKEN not in text
        assert NEW_REFRESH_TOKEN not in text
        assert "86399" in text


def test_token_response_validation_errors_hide_the_input() -> None:
    with pytest.raises(ValueError, match="expires_in") as excinfo:
        TokenResponse.model_validate(token_body(expires_in="never", access_token=""))

    assert NEW_REFRESH_TOKEN not in str(excinfo.value)
    assert "never" not in str(excinfo.value)


# --------------------------------------------------------------------------- failure classification


@pytest.mark.parametrize(
    ("body", "error_code"),
    [
        ({"error": "invalid_request", "error_description": "Invalid refresh token"}, "invalid_request"),
        ({"error": "invalid_grant"}, "invalid_grant"),
        ({"error": "unsupported_grant_type"}, "unsupported_grant_type"),
        ({"error": "INVALID_GRANT"}, "invalid_grant"),
        ({"error": "invalid grant <script>"}, "http_400"),
        ({"error": "x" * 65}, "http_400"),
        ({"message": "bad"}, "http_400"),
        ("Bad Request", "http_400"),
        ("", "http_400"),
    ],
    ids=[
        "invalid_request",
        "invalid_grant",
        "unsupported_grant_type",
        "uppercase",
        "unsafe-code",
        "too-long-code",
        "no-error-key",
        "plain-text",
        "empty",
    ],
)
@pytest.mark.parametrize("operation", ["refresh", "exchange_code"])
def test_c6_400_from_token_endpoint_is_grant_rejected_after_exactly_one_request(
    client: SonosClient,
    rsps: responses.RequestsMock,
    sleeps: list[float],
    operation: str,
    body: Any,
    error_code: str,
) -> None:
    if isinstance(body, dict):
        rsps.post(TOKEN_URL, status=400, json=body)
    else:
        rsps.post(TOKEN_URL, status=400, body=body, content_type="text/plain")

    with pytest.raises(SonosGrantRejected) as excinfo:
        client.refresh(REFRESH_TOKEN) if operation == "refresh" else client.exchange_code(CODE, REDIRECT_URI)

    assert excinfo.value.error_code == error_code
    assert excinfo.value.status == 400
    assert excinfo.value.operation == operation
    assert len(rsps.calls) == 1
    assert sleeps == []


def test_c6_500_is_retried_to_max_attempts_then_unavailable(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=500, json={"error": "server_error"})

    with pytest.raises(SonosUnavailable) as excinfo:
        client.refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 3
    assert len(sleeps) == 2
    assert excinfo.value.status == 500
    assert excinfo.value.retryable is True


@pytest.mark.parametrize(
    "failure",
    [
        requests.exceptions.ConnectionError("Connection reset by peer"),
        requests.exceptions.ReadTimeout("timed out"),
        requests.exceptions.ChunkedEncodingError("connection broken mid-body"),
    ],
    ids=["connection-reset", "timeout", "broken-body"],
)
def test_c6_transport_failure_is_retried_to_max_attempts_then_unavailable(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float], failure: Exception
) -> None:
    rsps.post(TOKEN_URL, body=failure)

    with pytest.raises(SonosUnavailable) as excinfo:
        client.refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 3
    assert len(sleeps) == 2
    assert excinfo.value.status is None
    assert type(failure).__name__ in str(excinfo.value)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(client: SonosClient, rsps: responses.RequestsMock, status: int) -> None:
    rsps.post(TOKEN_URL, status=status)
    rsps.post(TOKEN_URL, json=token_body())

    assert client.refresh(REFRESH_TOKEN).access_token == ACCESS_TOKEN
    assert len(rsps.calls) == 2


def test_transient_failure_with_one_attempt_configured_makes_exactly_one_request(
    make_client: Callable[..., SonosClient], rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=503)

    with pytest.raises(SonosUnavailable):
        make_client(max_attempts=1).refresh(REFRESH_TOKEN)

    assert len(rsps.calls) == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": "invalid_client"}),
        (401, {"error": "invalid_client", "error_description": "Client authentication failed"}),
        (401, {"fault": {"faultstring": "Invalid client", "detail": {"errorcode": "steps.oauth.v2.invalid_client"}}}),
        (400, {"error": "invalid_client"}),
    ],
    ids=["401-error", "401-error-with-description", "401-apigee-fault", "400-error"],
)
@pytest.mark.parametrize("operation", ["refresh", "exchange_code"])
def test_c12_invalid_client_is_client_rejected_after_exactly_one_request(
    client: SonosClient, rsps: responses.RequestsMock, operation: str, status: int, body: dict[str, Any]
) -> None:
    rsps.post(TOKEN_URL, status=status, json=body)

    with pytest.raises(SonosClientRejected, match="invalid_client"):
        client.refresh(REFRESH_TOKEN) if operation == "refresh" else client.exchange_code(CODE, REDIRECT_URI)

    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "error_code"),
    [
        ({"error": "invalid_token"}, "application/json", "invalid_token"),
        (
            {
                "fault": {
                    "faultstring": "Invalid Access Token",
                    "detail": {"errorcode": "keymanagement.service.invalid_access_token"},
                }
            },
            "application/json",
            "invalid_access_token",
        ),
        ({"fault": "Unauthorized"}, "application/json", "http_401"),
        ("Unauthorized", "text/plain", "http_401"),
        ("", "text/plain", "http_401"),
        ("{not json", "application/json", "http_401"),
    ],
    ids=["json-error", "json-fault", "json-fault-string", "plain-text", "empty", "broken-json"],
)
def test_refresh_401_with_any_other_body_is_grant_rejected_after_exactly_one_request(
    client: SonosClient, rsps: responses.RequestsMock, body: Any, content_type: str, error_code: str
) -> None:
    if isinstance(body, dict):
        rsps.post(TOKEN_URL, status=401, json=body)
    else:
        rsps.post(TOKEN_URL, status=401, body=body, content_type=content_type)

    with pytest.raises(SonosGrantRejected) as excinfo:
        client.refresh(REFRESH_TOKEN)

    assert excinfo.value.error_code == error_code
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("status", [403, 404, 405, 415])
def test_unexpected_4xx_from_token_endpoint_is_a_configuration_error_not_a_rejected_grant(
    client: SonosClient, rsps: responses.RequestsMock, status: int
) -> None:
    rsps.post(TOKEN_URL, status=status)

    with pytest.raises(SonosClientRejected) as excinfo:
        client.refresh(REFRESH_TOKEN)

    assert excinfo.value.status == status
    assert len(rsps.calls) == 1


def test_unusable_base_url_is_a_configuration_error_without_retries(
    make_client: Callable[..., SonosClient], sleeps: list[float]
) -> None:
    with pytest.raises(SonosClientRejected, match="MissingSchema"):
        make_client(auth_base_url="api.sonos.com").refresh(REFRESH_TOKEN)

    assert sleeps == []


def _response(status: int, body: Any = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return response


@pytest.mark.parametrize(
    ("operation", "status", "body", "outcome"),
    [
        (Operation.REFRESH, 200, None, Outcome.OK),
        (Operation.REFRESH, 204, None, Outcome.OK),
        (Operation.REFRESH, 400, {"error": "invalid_grant"}, Outcome.GRANT_REJECTED),
        (Operation.REFRESH, 401, b"nope", Outcome.GRANT_REJECTED),
        (Operation.REFRESH, 401, {"error": "invalid_client"}, Outcome.CLIENT_REJECTED),
        (Operation.REFRESH, 429, None, Outcome.TRANSIENT),
        (Operation.REFRESH, 503, {"error": "invalid_client"}, Outcome.TRANSIENT),
        (Operation.EXCHANGE_CODE, 400, {"error": "invalid_request"}, Outcome.GRANT_REJECTED),
        (Operation.EXCHANGE_CODE, 404, None, Outcome.CLIENT_REJECTED),
        (Operation.LIST_HOUSEHOLDS, 401, None, Outcome.GRANT_REJECTED),
        (Operation.LIST_HOUSEHOLDS, 403, {"errorCode": "ERROR_NOT_AUTHORIZED"}, Outcome.GRANT_REJECTED),
        (Operation.LIST_HOUSEHOLDS, 401, {"error": "invalid_client"}, Outcome.CLIENT_REJECTED),
        (Operation.LIST_HOUSEHOLDS, 400, None, Outcome.CLIENT_REJECTED),
        (Operation.LIST_HOUSEHOLDS, 502, None, Outcome.TRANSIENT),
        (Operation.REVOKE, 200, None, Outcome.OK),
        (Operation.REVOKE, 404, None, Outcome.UNSUPPORTED),
        (Operation.REVOKE, 405, None, Outcome.UNSUPPORTED),
        (Operation.REVOKE, 503, None, Outcome.TRANSIENT),
        (Operation.REFRESH, 302, None, Outcome.CLIENT_REJECTED),
    ],
)
def test_classify_keys_on_status_and_only_reads_the_body_for_invalid_client(
    operation: Operation, status: int, body: Any, outcome: Outcome
) -> None:
    assert classify(_response(status, body), operation) is outcome


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (requests.exceptions.ConnectTimeout(), Outcome.TRANSIENT),
        (requests.exceptions.ReadTimeout(), Outcome.TRANSIENT),
        (requests.exceptions.ConnectionError(), Outcome.TRANSIENT),
        (requests.exceptions.SSLError(), Outcome.TRANSIENT),
        (requests.exceptions.InvalidURL(), Outcome.CLIENT_REJECTED),
        (requests.exceptions.MissingSchema(), Outcome.CLIENT_REJECTED),
    ],
)
def test_classify_transport_failures(failure: requests.RequestException, outcome: Outcome) -> None:
    for operation in Operation:
        assert classify(failure, operation) is outcome


# --------------------------------------------------------------------------- backoff and Retry-After


def test_429_with_retry_after_seconds_sleeps_that_long(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=429, headers={"Retry-After": "2"})
    rsps.post(TOKEN_URL, json=token_body())

    client.refresh(REFRESH_TOKEN)

    assert sleeps == [2.0]
    assert len(rsps.calls) == 2


def test_retry_after_longer_than_cap_is_capped(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=503, headers={"Retry-After": "3600"})
    rsps.post(TOKEN_URL, json=token_body())

    client.refresh(REFRESH_TOKEN)

    assert sleeps == [5.0]


def test_retry_after_http_date_is_honoured_and_capped(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    far_future = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    long_past = "Sun, 06 Nov 1994 08:49:37 GMT"
    rsps.post(TOKEN_URL, status=429, headers={"Retry-After": far_future})
    rsps.post(TOKEN_URL, status=429, headers={"Retry-After": long_past})
    rsps.post(TOKEN_URL, json=token_body())

    client.refresh(REFRESH_TOKEN)

    assert sleeps == [5.0, 0.0]


def test_unreadable_retry_after_falls_back_to_jittered_backoff(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=429, headers={"Retry-After": "soon-ish"})
    rsps.post(TOKEN_URL, json=token_body())

    client.refresh(REFRESH_TOKEN)

    assert sleeps == [0.25]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 03 Dec 2026 18:00:10 GMT", 10.0),
        ("Wed, 03 Dec 2026 17:00:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("-3", None),
        ("later", None),
    ],
)
def test_retry_after_seconds_reads_delay_seconds_and_http_dates(value: str | None, seconds: float | None) -> None:
    now = datetime(2026, 12, 3, 18, 0, 0, tzinfo=UTC)

    assert retry_after_seconds(value, now=now) == seconds


def test_backoff_uses_full_jitter_over_a_doubling_window(
    make_client: Callable[..., SonosClient], rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(TOKEN_URL, status=503)
    client = make_client(random=FixedRandom(0.5, 1.0, 1.0, 0.0), max_attempts=5)

    with pytest.raises(SonosUnavailable):
        client.refresh(REFRESH_TOKEN)

    # windows 0.25, 0.5, 1.0, 2.0 (cap) scaled by the injected random values
    assert sleeps == [0.125, 0.5, 1.0, 0.0]
    assert len(rsps.calls) == 5


def test_full_jitter_delays_stay_within_bounds() -> None:
    rng = stdlib_random.Random(20261203)  # seeded: a repeatable spread
    for failed_attempts in range(1, 80):
        window = min(2.0, 0.25 * 2 ** (failed_attempts - 1))
        delays = [
            full_jitter_delay(failed_attempts, base_seconds=0.25, cap_seconds=2.0, random=rng.random) for _ in range(50)
        ]
        assert all(0.0 <= delay <= window for delay in delays)
        assert max(delays) > window / 2  # spread over the window, not pinned at one end


# --------------------------------------------------------------------------- households


def test_list_households_sends_bearer_token_and_returns_the_one_id(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_abc.123", "name": "Home"}]})

    assert client.list_households(ACCESS_TOKEN) == ["Sonos_abc.123"]
    assert len(rsps.calls) == 1
    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert timeout_of(rsps.calls[0]) == (3.05, 10.0)


def test_list_households_keeps_order_of_several(client: SonosClient, rsps: responses.RequestsMock) -> None:
    rsps.get(HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_b"}, {"id": "Sonos_a"}, {"id": "Sonos_c"}]})

    assert client.list_households(ACCESS_TOKEN) == ["Sonos_b", "Sonos_a", "Sonos_c"]


def test_list_households_drops_repeated_ids_keeping_first_position(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_b"}, {"id": "Sonos_a"}, {"id": "Sonos_b"}]})

    assert client.list_households(ACCESS_TOKEN) == ["Sonos_b", "Sonos_a"]


def test_list_households_with_none_is_an_empty_list(client: SonosClient, rsps: responses.RequestsMock) -> None:
    # A valid answer (an account with no Sonos system set up yet); the manager decides what it means.
    rsps.get(HOUSEHOLDS_URL, json={"households": []})

    assert client.list_households(ACCESS_TOKEN) == []
    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    "body",
    [{}, {"households": None}, {"households": {"id": "Sonos_a"}}, {"households": [{"name": "no id"}]}, [], "text"],
    ids=["no-key", "null", "object", "item-without-id", "json-list", "not-json"],
)
def test_list_households_without_a_households_list_is_invalid_response(
    client: SonosClient, rsps: responses.RequestsMock, body: Any
) -> None:
    if body == "text":
        rsps.get(HOUSEHOLDS_URL, body="households: a", content_type="text/plain")
    else:
        rsps.get(HOUSEHOLDS_URL, json=body)

    with pytest.raises(SonosInvalidResponse):
        client.list_households(ACCESS_TOKEN)


@pytest.mark.parametrize("status", [401, 403])
def test_list_households_401_or_403_is_grant_rejected_after_one_request(
    client: SonosClient, rsps: responses.RequestsMock, status: int
) -> None:
    rsps.get(HOUSEHOLDS_URL, status=status, body="Forbidden", content_type="text/plain")

    with pytest.raises(SonosGrantRejected) as excinfo:
        client.list_households(ACCESS_TOKEN)

    assert excinfo.value.error_code == f"http_{status}"
    assert len(rsps.calls) == 1


def test_list_households_invalid_client_is_client_rejected(client: SonosClient, rsps: responses.RequestsMock) -> None:
    rsps.get(HOUSEHOLDS_URL, status=401, json={"error": "invalid_client"})

    with pytest.raises(SonosClientRejected):
        client.list_households(ACCESS_TOKEN)

    assert len(rsps.calls) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_list_households_transient_failure_is_retried(
    client: SonosClient, rsps: responses.RequestsMock, status: int
) -> None:
    rsps.get(HOUSEHOLDS_URL, status=status)
    rsps.get(HOUSEHOLDS_URL, json={"households": [{"id": "Sonos_a"}]})

    assert client.list_households(ACCESS_TOKEN) == ["Sonos_a"]
    assert len(rsps.calls) == 2


def test_list_households_keeps_failing_then_unavailable(client: SonosClient, rsps: responses.RequestsMock) -> None:
    rsps.get(HOUSEHOLDS_URL, status=503)

    with pytest.raises(SonosUnavailable):
        client.list_households(ACCESS_TOKEN)

    assert len(rsps.calls) == 3


# --------------------------------------------------------------------------- revoke


def test_revoke_without_revoke_url_returns_false_without_a_request(
    make_client: Callable[..., SonosClient], rsps: responses.RequestsMock
) -> None:
    assert make_client(revoke_url="").revoke(REFRESH_TOKEN) is False
    assert len(rsps.calls) == 0


def test_revoke_2xx_returns_true_after_posting_the_token_with_client_auth(
    client: SonosClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(REVOKE_URL, status=200)

    assert client.revoke(REFRESH_TOKEN) is True
    assert len(rsps.calls) == 1
    assert basic_credentials(rsps.calls[0]) == f"{CLIENT_ID}:{CLIENT_SECRET}"
    assert form(rsps.calls[0]) == {"token": [REFRESH_TOKEN]}
    assert timeout_of(rsps.calls[0]) == (3.05, 10.0)


@pytest.mark.parametrize("status", [404, 405])
def test_revoke_on_missing_endpoint_returns_false_after_one_request(
    client: SonosClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    rsps.post(REVOKE_URL, status=status)

    with caplog.at_level(logging.INFO, logger="token_manager"):
        assert client.revoke(REFRESH_TOKEN) is False

    assert len(rsps.calls) == 1
    assert any("not supported" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, {"error": "invalid_request"}), (401, {"error": "invalid_client"}), (403, None), (418, None)],
)
def test_revoke_rejected_returns_false_after_one_request_and_logs(
    client: SonosClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture, status: int, body: Any
) -> None:
    rsps.post(REVOKE_URL, status=status, json=body)

    with caplog.at_level(logging.INFO, logger="token_manager"):
        assert client.revoke(REFRESH_TOKEN) is False

    assert len(rsps.calls) == 1
    assert any(record.levelno == logging.WARNING for record in caplog.records)


@pytest.mark.parametrize(
    "failure",
    [503, requests.exceptions.ConnectionError("reset"), requests.exceptions.ReadTimeout("slow")],
    ids=["503", "connection-error", "timeout"],
)
def test_revoke_transient_failure_retries_at_most_max_attempts_then_returns_false(
    client: SonosClient, rsps: responses.RequestsMock, sleeps: list[float], failure: int | Exception
) -> None:
    if isinstance(failure, int):
        rsps.post(REVOKE_URL, status=failure)
    else:
        rsps.post(REVOKE_URL, body=failure)

    assert client.revoke(REFRESH_TOKEN) is False
    assert len(rsps.calls) == 3
    assert len(sleeps) == 2


def test_revoke_never_raises_even_when_the_transport_breaks_unexpectedly(config: SonosClientConfig) -> None:
    class BrokenSession(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> requests.Response:
            raise RuntimeError("adapter bug")

    client = SonosClient(config, session=BrokenSession(), sleep=lambda _: None)

    assert client.revoke(REFRESH_TOKEN) is False


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("client_id", ""),
        ("client_secret", " "),
        ("auth_base_url", ""),
        ("connect_timeout", 0),
        ("read_timeout", float("inf")),
        ("max_attempts", 0),
        ("backoff_base_seconds", -1.0),
        ("retry_after_cap_seconds", float("nan")),
    ],
)
def test_config_rejects_unusable_settings_naming_the_setting(field: str, value: Any) -> None:
    settings: dict[str, Any] = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, field: value}

    with pytest.raises(ConfigurationError, match=field) as excinfo:
        SonosClientConfig(**settings)

    assert CLIENT_SECRET not in str(excinfo.value)


def test_config_and_client_reprs_hide_the_client_secret(config: SonosClientConfig, client: SonosClient) -> None:
    assert CLIENT_SECRET not in repr(config)
    assert CLIENT_SECRET not in str(config)
    assert CLIENT_SECRET not in repr(client)
    assert CLIENT_ID in repr(config)


# --------------------------------------------------------------------------- secrets never leak

ECHO = f"echo {ACCESS_TOKEN} {REFRESH_TOKEN} {NEW_REFRESH_TOKEN} {CODE} {CLIENT_SECRET}"


def _failure_scenarios() -> list[Any]:
    echo_json = {"error": "invalid_grant", "error_description": ECHO, "token": REFRESH_TOKEN}
    return [
        pytest.param("refresh", "POST", TOKEN_URL, {"status": 400, "json": echo_json}, id="refresh-400-echo"),
        pytest.param("exchange", "POST", TOKEN_URL, {"status": 400, "json": echo_json}, id="exchange-400-echo"),
        pytest.param("refresh", "POST", TOKEN_URL, {"status": 401, "body": ECHO}, id="refresh-401-text-echo"),
        pytest.param(
            "refresh", "POST", TOKEN_URL, {"status": 401, "json": {"error": "invalid_client", "d": ECHO}}, id="c12-echo"
        ),
        pytest.param(
            "refresh", "POST", TOKEN_URL, {"status": 503, "body": ECHO, "headers": {"Retry-After": "1"}}, id="503-echo"
        ),
        pytest.param("exchange", "POST", TOKEN_URL, {"body": requests.exceptions.ConnectionError(ECHO)}, id="conn"),
        pytest.param(
            "exchange", "POST", TOKEN_URL, {"json": token_body(expires_in=_ABSENT, note=ECHO)}, id="c5-no-expiry"
        ),
        pytest.param(
            "refresh", "POST", TOKEN_URL, {"json": token_body(expires_in=ECHO, access_token="")}, id="bad-fields"
        ),
        pytest.param("refresh", "POST", TOKEN_URL, {"body": ECHO, "content_type": "text/plain"}, id="200-not-json"),
        pytest.param("households", "GET", HOUSEHOLDS_URL, {"status": 401, "body": ECHO}, id="households-401"),
        pytest.param("households", "GET", HOUSEHOLDS_URL, {"json": {"households": ECHO}}, id="households-not-a-list"),
        pytest.param("households", "GET", HOUSEHOLDS_URL, {"status": 500, "body": ECHO}, id="households-500"),
        pytest.param("revoke", "POST", REVOKE_URL, {"status": 500, "body": ECHO}, id="revoke-500"),
        pytest.param("revoke", "POST", REVOKE_URL, {"status": 404, "body": ECHO}, id="revoke-404"),
        pytest.param("revoke", "POST", REVOKE_URL, {"status": 400, "json": echo_json}, id="revoke-400"),
    ]


def _exception_texts(exc: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(exc)), repr(exc), str(exc)]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen.args)]
        seen = (
            seen.__cause__ if seen.__cause__ is not None else (None if seen.__suppress_context__ else seen.__context__)
        )
    return texts


@pytest.mark.parametrize(("call", "method", "url", "reply"), _failure_scenarios())
def test_failures_never_put_tokens_secret_or_code_in_exceptions_or_logs(
    client: SonosClient,
    rsps: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    call: str,
    method: str,
    url: str,
    reply: dict[str, Any],
) -> None:
    rsps.add(method, url, **reply)
    texts: list[str] = []

    with caplog.at_level(logging.DEBUG):
        try:
            if call == "refresh":
                client.refresh(REFRESH_TOKEN)
            elif call == "exchange":
                client.exchange_code(CODE, REDIRECT_URI)
            elif call == "households":
                client.list_households(ACCESS_TOKEN)
            else:
                assert client.revoke(REFRESH_TOKEN) is False
        except SonosError as exc:
            texts += _exception_texts(exc)
        else:
            assert call == "revoke", "every scenario here is a failure"

    assert caplog.records, "each failure path logs at least one line"
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.__dict__)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
