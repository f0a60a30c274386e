"""The edge: request models, the one mapping from errors to answers, answer shapes, the API
resolver's refusals, the callback's browser answers and the correlation id."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

import pydantic
import pytest
from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from token_manager import edge, link_pages
from token_manager.edge import FetchRequest, InitiateRequest, RevokeRequest, ServiceApi
from token_manager.errors import (
    ALL_ERRORS,
    AccessDenied,
    ConfigurationError,
    InvalidState,
    KeyRingError,
    NotConnected,
    TokenDecryptionError,
    TokenServiceError,
    UpstreamUnavailable,
)
from token_manager.manager import AccessToken, AuthorizationRequest, RevokeResult
from token_manager.observability import CountingMetrics, correlation_id_of

MARKER = "VALUE-MARKER-never-echoed-41d2"


# --------------------------------------------------------------------------- request models


def test_request_models_read_camel_case_and_ignore_unknown_fields() -> None:
    fetch = FetchRequest.model_validate(
        {"userId": "u-1", "householdId": "Sonos_1", "correlationId": "c-1", "unknown": {"x": [1]}}
    )
    assert (fetch.user_id, fetch.household_id, fetch.correlation_id) == ("u-1", "Sonos_1", "c-1")
    revoke = RevokeRequest.model_validate({"userId": "u-1", "extra": True})
    assert (revoke.user_id, revoke.household_id) == ("u-1", None)
    initiate = InitiateRequest.model_validate({"userId": "u-1", "redirectUri": "https://example.test/cb"})
    assert initiate.redirect_uri == "https://example.test/cb"


@pytest.mark.parametrize("model", [FetchRequest, RevokeRequest, InitiateRequest])
def test_ids_may_be_256_characters_but_not_257(model: type[pydantic.BaseModel]) -> None:
    model.model_validate({"userId": "u" * 256})
    with pytest.raises(pydantic.ValidationError):
        model.model_validate({"userId": "u" * 257})


def test_redirect_uri_may_be_2048_characters_but_not_2049() -> None:
    InitiateRequest.model_validate({"userId": "u", "redirectUri": "h" * 2048})
    with pytest.raises(pydantic.ValidationError):
        InitiateRequest.model_validate({"userId": "u", "redirectUri": "h" * 2049})


@pytest.mark.parametrize("value", [5, 5.0, True, ["u"], {"id": "u"}, None, b"u"])
def test_ids_of_other_types_are_refused_not_coerced(value: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        FetchRequest.model_validate({"userId": value})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "userId is required."),
        ({"userId": 5}, "userId must be a string."),
        ({"userId": ""}, "userId must not be empty."),
        ({"userId": "u" * 300 + MARKER}, "userId must be at most 256 characters."),
        ({"userId": "u", "householdId": [MARKER]}, "householdId must be a string."),
        ({"userId": 1, "householdId": 2}, "userId must be a string. householdId must be a string."),
    ],
)
def test_validation_message_names_the_field_never_the_value(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        FetchRequest.model_validate(payload)
    error = edge.service_error_for(caught.value)
    assert (error.code, error.status, error.message) == ("invalid_request", 400, message)
    assert MARKER not in str(caught.value)  # hidden from the exception text too


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ({"type": "json_invalid", "loc": ("body", 3)}, "The request body is not valid JSON."),
        ({"type": "model_attributes_type", "loc": ("body",)}, "The request body must be a JSON object."),
        ({"type": "missing", "loc": ("query", "userId")}, "userId is required."),
        (
            {"type": "string_too_long", "loc": ("query", "userId"), "ctx": {"max_length": 256}},
            "userId must be at most 256 characters.",
        ),
        ({"type": "string_too_short", "loc": ("body", "redirectUri")}, "redirectUri must not be empty."),
        ({"type": "value_error", "loc": ("body", "weird key with spaces")}, "A field is invalid."),
        ({"type": "model_attributes_type", "loc": ()}, "The payload must be a JSON object."),
    ],
)
def test_invalid_request_from_describes_each_kind_of_problem(problem: dict[str, Any], message: str) -> None:
    assert edge.invalid_request_from([problem]).message == message


def test_invalid_request_from_nothing_is_the_generic_message() -> None:
    assert edge.invalid_request_from([]).message == "The request is malformed."


# --------------------------------------------------------------------------- the error mapping


@pytest.mark.parametrize("error_type", ALL_ERRORS, ids=lambda error_type: error_type.code)
def test_every_taxonomy_error_answers_with_its_code_and_status_in_both_shapes(
    error_type: type[TokenServiceError],
) -> None:
    error = error_type()

    def fail(_: Mapping[str, Any]) -> dict[str, Any]:
        raise error

    assert edge.answer_direct({"userId": "u"}, fail) == {
        "error": {"code": error.code, "message": error.message, "status": error.status}
    }
    api = ServiceApi()

    @api.get("/fail")
    def failing() -> Response[str]:
        raise error

    answer = api.answer(api_event("GET", "/fail"), None)
    assert answer["statusCode"] == error.status
    assert json.loads(answer["body"]) == {"error": {"code": error.code, "message": error.message}}
    assert answer["multiValueHeaders"]["Cache-Control"] == ["no-store"]


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (KeyRingError("key 'k1' is 16 bytes"), "The token key ring is unusable."),
        (TokenDecryptionError(), "A stored token cannot be decrypted with the configured key ring."),
    ],
)
def test_key_ring_and_decryption_failures_become_configuration_error(exc: Exception, message: str) -> None:
    error = edge.service_error_for(exc)
    assert isinstance(error, ConfigurationError)
    assert error.message == message


def test_an_unexpected_exception_is_internal_error_logged_by_class_and_place_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="token_manager")

    def buggy(_: Mapping[str, Any]) -> dict[str, Any]:
        raise KeyError(MARKER)

    answer = edge.answer_direct({}, buggy)
    assert answer == {"error": {"code": "internal_error", "message": "Internal error.", "status": 500}}
    (record,) = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert record.__dict__["error"] == "KeyError"
    assert re.fullmatch(r"test_edge\.py:\d+ in buggy", record.__dict__["at"])
    assert MARKER not in caplog.text
    assert all(MARKER not in json.dumps(r.__dict__, default=str) for r in caplog.records)


@pytest.mark.parametrize("payload", [None, [], "text", 7])
def test_a_direct_payload_that_is_not_an_object_is_invalid_request(payload: object) -> None:
    answer = edge.answer_direct(payload, lambda _: {"never": "called"})
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["message"] == "The payload must be a JSON object."


def test_serve_refuses_a_direct_payload_when_the_function_is_api_only() -> None:
    answer = edge.serve({"code": "c"}, None, api=ServiceApi())
    assert answer["error"] == {
        "code": "invalid_request",
        "message": "This function answers API Gateway requests only.",
        "status": 400,
    }


@pytest.mark.parametrize(
    ("event", "is_api"),
    [
        ({"httpMethod": "GET", "path": "/x"}, True),
        ({"requestContext": {}}, True),
        ({"userId": "u"}, False),
        ({}, False),
        ([], False),
        (None, False),
    ],
)
def test_is_api_event(event: object, is_api: bool) -> None:
    assert edge.is_api_event(event) is is_api


# --------------------------------------------------------------------------- answers


def test_iso_utc_is_utc_with_z_to_the_second() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert edge.iso_utc(datetime(2026, 12, 4, 14, 0, 0, 999_999, tzinfo=plus_two)) == "2026-12-04T12:00:00Z"


def test_answer_shapes() -> None:
    token = AccessToken(
        access_token="tok",
        household_id="Sonos_2",
        household_ids=("Sonos_1", "Sonos_2"),
        expires_at=datetime(2026, 12, 4, 12, 0, 30, tzinfo=UTC),
    )
    assert edge.fetch_answer(token) == {
        "accessToken": "tok",
        "householdId": "Sonos_2",
        "householdIds": ["Sonos_1", "Sonos_2"],
        "expiresAt": "2026-12-04T12:00:30Z",
    }
    assert edge.revoke_answer(RevokeResult(revoked=True, provider_revoked=False)) == {
        "revoked": True,
        "providerRevoked": False,
    }
    authorization = AuthorizationRequest(authorization_url="https://a.test/x", state="s", expires_in=600)
    assert edge.initiate_answer(authorization) == {
        "authorizationUrl": "https://a.test/x",
        "state": "s",
        "expiresIn": 600,
    }


# --------------------------------------------------------------------------- the API resolver


def api_event(
    method: str | None,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: str | None = None,
    base64_encoded: bool = False,
    content_type: str | None = None,
    repeated: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    multi_query = {k: [v] for k, v in query.items()} if query else {}
    multi_query.update(repeated or {})
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {"requestId": "req-1", "stage": "test", "httpMethod": method, "path": path},
        "body": body,
        "isBase64Encoded": base64_encoded,
    }


@pytest.fixture
def api() -> ServiceApi:
    app = ServiceApi()

    @app.get("/items")
    def get_item(user_id: Annotated[str, Query(alias="userId", min_length=1, max_length=8)]) -> Response[str]:
        return edge.json_answer({"userId": user_id})

    @app.post("/items")
    def post_item(request: Annotated[RevokeRequest, Body()]) -> Response[str]:
        return edge.json_answer({"userId": request.user_id})

    return app


def refusal(answer: dict[str, Any]) -> tuple[int, str, str]:
    error = json.loads(answer["body"])["error"]
    assert set(error) == {"code", "message"}
    return answer["statusCode"], error["code"], error["message"]


def test_api_answers_a_valid_request(api: ServiceApi) -> None:
    answer = api.answer(api_event("GET", "/items", query={"userId": "u-1"}), None)
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"userId": "u-1"}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (api_event("GET", "/items"), (400, "invalid_request", "userId is required.")),
        (
            api_event("GET", "/items", query={"userId": "x" * 9}),
            (400, "invalid_request", "userId must be at most 8 characters."),
        ),
        (api_event("POST", "/items", body="{"), (400, "invalid_request", "The request body is not valid JSON.")),
        (api_event("POST", "/items", body="[1]"), (400, "invalid_request", "The request body must be a JSON object.")),
        (api_event("POST", "/items", body='{"userId": 3}'), (400, "invalid_request", "userId must be a string.")),
        (api_event("POST", "/items"), (400, "invalid_request", "A JSON request body is required.")),
        (
            api_event("POST", "/items", body=base64.b64encode(b"\xc3\x28").decode(), base64_encoded=True),
            (400, "invalid_request", "The request body is not valid UTF-8 JSON."),
        ),
        (
            api_event("POST", "/items", body="%%%", base64_encoded=True),
            (400, "invalid_request", "The request body is not valid UTF-8 JSON."),
        ),
        (
            api_event("POST", "/items", body="\udcff"),
            (400, "invalid_request", "The request body is not valid UTF-8 JSON."),
        ),
        (
            api_event("POST", "/items", body="[" * 50_000),
            (400, "invalid_request", "The request body is not valid JSON."),
        ),
        (
            api_event("POST", "/items", body='{"userId": "u"}', content_type="text/plain"),
            (400, "invalid_request", "The request body must be JSON (Content-Type: application/json)."),
        ),
        (
            api_event("GET", "/items", query={"userId": "u-1"}, repeated={"userId": ["u-1", "u-2"]}),
            (400, "invalid_request", "userId must be given once."),
        ),
        (
            api_event("GET", "/items", query={"userId": "u-1"}, repeated={"user id": ["a", "b"]}),
            (400, "invalid_request", "A query parameter must be given once."),
        ),
        (api_event(None, "/items"), (400, "invalid_request", "The API Gateway event has no method or path.")),
        (api_event("GET", "/elsewhere"), (404, "not_found", "No such route.")),
        (api_event("PATCH", "/items"), (405, "method_not_allowed", "This route does not accept that method.")),
    ],
    ids=[
        "missing-query",
        "query-too-long",
        "broken-json",
        "json-list",
        "wrong-type",
        "no-body",
        "not-utf8",
        "not-base64",
        "lone-surrogate",
        "deep-nesting",
        "not-json-content-type",
        "repeated-query",
        "repeated-unnamed-query",
        "no-method",
        "unknown-route",
        "unknown-method",
    ],
)
def test_api_refusals_are_4xx_in_our_shape(
    api: ServiceApi, event: dict[str, Any], expected: tuple[int, str, str]
) -> None:
    answer = api.answer(event, None)
    assert refusal(answer) == expected
    assert "Traceback" not in answer["body"]


def test_method_not_allowed_names_the_allowed_methods(api: ServiceApi) -> None:
    answer = api.answer(api_event("DELETE", "/items"), None)
    assert answer["multiValueHeaders"]["Allow"] == ["GET, POST"]


def test_a_failure_outside_the_routes_still_answers_in_our_shape(
    api: ServiceApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    def resolver_trips(*_: object) -> dict[str, Any]:
        raise TypeError("the resolver tripped")  # Powertools failing on an event it cannot read

    monkeypatch.setattr(api, "resolve", resolver_trips)
    event = api_event("GET", "/items", query={"userId": "u"})
    assert refusal(api.answer(event, None)) == (500, "internal_error", "Internal error.")


def test_an_event_part_of_the_wrong_type_is_refused_before_the_resolver(api: ServiceApi) -> None:
    event = api_event("GET", "/items", query={"userId": "u"})
    event["multiValueQueryStringParameters"] = "not a mapping"  # Powertools itself would trip over this
    assert refusal(api.answer(event, None)) == (400, "invalid_request", "The API Gateway event is malformed.")


# --------------------------------------------------------------------------- callback answers


def test_success_redirect_is_the_configured_url_exactly() -> None:
    answer = link_pages.link_succeeded(link_pages.LinkUrls(success="https://app.test/ok?x=1"))
    assert answer.status_code == 302
    assert answer.headers["Location"] == "https://app.test/ok?x=1"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("failure_url", "location"),
    [
        ("https://app.test/failed", "https://app.test/failed?error=access_denied"),
        ("https://app.test/failed?from=sonos", "https://app.test/failed?from=sonos&error=access_denied"),
        ("https://app.test/failed#top", "https://app.test/failed?error=access_denied#top"),
    ],
)
def test_failure_redirect_appends_only_the_error_code(failure_url: str, location: str) -> None:
    answer = link_pages.link_failed(AccessDenied(), link_pages.LinkUrls(failure=failure_url))
    assert answer.status_code == 302
    assert answer.headers["Location"] == location


@pytest.mark.parametrize(
    ("error", "status", "title"),
    [
        (AccessDenied(), 400, "Sonos was not connected"),
        (InvalidState(), 400, "This link has expired"),
        (UpstreamUnavailable(), 503, "Sonos could not be connected"),
        (ConfigurationError(), 500, "Sonos could not be connected"),
        (NotConnected(), 404, "Sonos could not be connected"),
    ],
)
def test_failure_pages(error: TokenServiceError, status: int, title: str) -> None:
    answer = link_pages.link_failed(error, link_pages.LinkUrls())
    assert answer.status_code == status
    assert f"<h1>{title}</h1>" in str(answer.body)
    assert error.message not in str(answer.body)  # the page is fixed text, never the error's detail


def test_pages_are_self_contained_with_a_strict_policy() -> None:
    answer = link_pages.link_succeeded(link_pages.LinkUrls())
    body = str(answer.body)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = str(answer.headers["Content-Security-Policy"])
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    style = re.search(r"<style>(.*)</style>", body)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy  # the one inline style is the only thing allowed
    assert "<script" not in body
    assert answer.headers["X-Frame-Options"] == "DENY"


# --------------------------------------------------------------------------- observability


@pytest.mark.parametrize(
    ("event", "correlation_id"),
    [
        ({"requestContext": {"requestId": "a3e9c7d1-6b2f"}, "correlationId": "ignored"}, "a3e9c7d1-6b2f"),
        ({"userId": "u", "correlationId": "req-01JEXAMPLE"}, "req-01JEXAMPLE"),
        ({"userId": "u", "correlationId": "has spaces and <html>"}, None),
        ({"userId": "u", "correlationId": "x" * 129}, None),
        ({"userId": "u", "correlationId": 42}, None),
        ({"userId": "u"}, None),
        ("not an object", None),
    ],
)
def test_correlation_id_comes_from_api_gateway_or_the_router(event: object, correlation_id: str | None) -> None:
    assert correlation_id_of(event) == correlation_id


class RecordingMetrics:
    def __init__(self) -> None:
        self.added: list[tuple[str, float]] = []

    def add_metric(self, *, name: str, unit: object, value: float) -> None:
        self.added.append((name, value))


def test_counts_are_summed_and_emitted_once_per_name() -> None:
    counts = CountingMetrics()
    for _ in range(250):
        counts.add("RefreshSucceeded")
    counts.add("CacheHit", 2)
    target = RecordingMetrics()
    counts.flush_into(target)  # type: ignore[arg-type]
    assert target.added == [("CacheHit", 2.0), ("RefreshSucceeded", 250.0)]
    assert counts.pending() == {}
