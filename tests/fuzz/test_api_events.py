"""API Gateway proxy events, wrong in every field, through each API function: the answer is
a proxy response in the error shape (or the route's answer), never a 500, a trace, exception
text or an echo of the input; the callback answers a browser with a page or a redirect."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given

from tests.support.answer_checks import check_api_answer, check_direct_answer
from tests.support.fuzz_strategies import FUZZ, INPUT_MARKER, ONE_MEGABYTE, api_events, base64_bodies
from tests.support.handlers import load_event
from tests.support.service_world import USER, ServiceWorld

pytestmark = pytest.mark.integration

SUCCESS_KEYS = {
    "oauth_initiate": {"authorizationUrl", "state", "expiresIn"},
    "token_fetch": {"accessToken", "householdId", "householdIds", "expiresAt"},
    "token_revoke": {"revoked", "providerRevoked"},
    "oauth_callback": set(),
}
SAMPLES = {
    "oauth_initiate": "oauth_initiate_api.json",
    "token_fetch": "token_fetch_api.json",
    "token_revoke": "token_revoke_api.json",
    "oauth_callback": "oauth_callback_api.json",
}


def _with(sample: str, **fields: Any) -> dict[str, Any]:
    return {**load_event(sample), **fields}


def _check(function: str, answer: Any) -> int:
    if isinstance(answer, dict) and "statusCode" not in answer:
        # Without httpMethod and requestContext the event is taken for a direct payload.
        check_direct_answer(answer, SUCCESS_KEYS[function], forbidden=[INPUT_MARKER])
        return 200 if "error" not in answer else int(answer["error"]["status"])
    return check_api_answer(
        answer,
        success_keys=SUCCESS_KEYS[function],
        browser=function == "oauth_callback",
        forbidden=[INPUT_MARKER],
    )


@FUZZ
@given(event=api_events(SAMPLES["oauth_initiate"]))
@example(event=_with(SAMPLES["oauth_initiate"], body='{"userId": "' + "u" * ONE_MEGABYTE + '"}'))
@example(event=_with(SAMPLES["oauth_initiate"], body="[" * 200_000))
@example(event=_with(SAMPLES["oauth_initiate"], requestContext={}))
@example(event=_with(SAMPLES["oauth_initiate"], headers=None, multiValueHeaders=None))
def test_initiate_api_events(world: ServiceWorld, event: dict[str, Any]) -> None:
    _check("oauth_initiate", world.invoke("oauth_initiate", event))


@FUZZ
@given(event=api_events(SAMPLES["token_fetch"]))
@example(event=_with(SAMPLES["token_fetch"], queryStringParameters={"userId": ["a", "b"]}))
@example(event=_with(SAMPLES["token_fetch"], multiValueQueryStringParameters={"userId": "not-a-list"}))
@example(event=_with(SAMPLES["token_fetch"], requestContext="not an object"))
def test_fetch_api_events(world: ServiceWorld, event: dict[str, Any]) -> None:
    _check("token_fetch", world.invoke("token_fetch", event))


@FUZZ
@given(event=api_events(SAMPLES["token_revoke"]))
@example(event=_with(SAMPLES["token_revoke"], queryStringParameters=None, body='{"userId": {"deep": ' * 40_000))
def test_revoke_api_events(world: ServiceWorld, event: dict[str, Any]) -> None:
    _check("token_revoke", world.invoke("token_revoke", event))


@FUZZ
@given(event=api_events(SAMPLES["oauth_callback"]))
@example(event=_with(SAMPLES["oauth_callback"], queryStringParameters={"state": ["x"], "code": 5}))
def test_callback_api_events(world: ServiceWorld, event: dict[str, Any]) -> None:
    _check("oauth_callback", world.invoke("oauth_callback", event))


@pytest.mark.parametrize("function", sorted(SAMPLES))
@FUZZ
@given(data=base64_bodies("oauth_initiate_api.json"))
def test_base64_bodies_that_are_not_utf8_json_are_refused_cleanly(
    world: ServiceWorld, function: str, data: dict[str, Any]
) -> None:
    event = {**load_event(SAMPLES[function]), "body": data["body"], "isBase64Encoded": True}
    status = _check(function, world.invoke(function, event))
    assert status < 500


MALFORMED_PARTS = [
    pytest.param("token_fetch", {"queryStringParameters": {"userId": None}}, id="query-value-null"),
    pytest.param("token_fetch", {"queryStringParameters": {"userId": ["a", "b"]}}, id="query-value-list"),
    pytest.param("token_fetch", {"multiValueQueryStringParameters": {"userId": "not-a-list"}}, id="multi-query-text"),
    pytest.param("oauth_initiate", {"queryStringParameters": {"userId": 5}}, id="query-value-number"),
    pytest.param("oauth_initiate", {"headers": ["Content-Type"]}, id="headers-list"),
    pytest.param("token_revoke", {"headers": {"Content-Type": 5}}, id="header-value-number"),
    pytest.param("oauth_initiate", {"multiValueHeaders": {"Content-Type": "application/json"}}, id="multi-header-text"),
    pytest.param("token_fetch", {"requestContext": "not an object"}, id="request-context-text"),
    pytest.param("token_fetch", {"pathParameters": "x"}, id="path-parameters-text"),
    pytest.param("token_fetch", {"isBase64Encoded": "yes"}, id="base64-flag-text"),
    pytest.param("oauth_callback", {"queryStringParameters": {"state": ["x"], "code": 5}}, id="callback-query-types"),
]


@pytest.mark.parametrize(("function", "change"), MALFORMED_PARTS)
def test_an_event_part_of_the_wrong_type_is_invalid_request_not_internal_error(
    world: ServiceWorld, function: str, change: dict[str, Any]
) -> None:
    answer = world.invoke(function, _with(SAMPLES[function], **change))
    assert answer["statusCode"] == 400, answer
    if function != "oauth_callback":
        assert json.loads(answer["body"]) == {
            "error": {"code": "invalid_request", "message": "The API Gateway event is malformed."}
        }


@pytest.mark.parametrize(
    ("query", "body", "named"),
    [
        pytest.param(
            {"userId": USER, "householdId": "Sonos_1"},
            {"householdId": "\u00d7\u00f8"},
            "householdId",
            id="body-household-outvoted",
        ),
        pytest.param({"userId": USER}, {"userId": "has space"}, "userId", id="body-user-outvoted"),
        pytest.param(None, {"userId": "has space"}, "userId", id="body-user-alone"),
    ],
)
def test_revoke_refuses_a_malformed_id_in_the_body_even_where_the_query_wins(
    world: ServiceWorld, query: dict[str, str] | None, body: dict[str, str], named: str
) -> None:
    event = _with(SAMPLES["token_revoke"], body=json.dumps(body))
    event["queryStringParameters"] = query
    event["multiValueQueryStringParameters"] = None if query is None else {k: [v] for k, v in query.items()}
    answer = world.invoke("token_revoke", event)
    assert answer["statusCode"] == 400, answer
    assert json.loads(answer["body"]) == {
        "error": {"code": "invalid_request", "message": f"{named} must be printable ASCII without spaces."}
    }
    assert world.row() is not None  # nothing was revoked


@pytest.mark.parametrize(
    ("function", "content_type", "body", "message"),
    [
        pytest.param("oauth_initiate", "multipart/form-data", None, "must be JSON", id="multipart-no-boundary"),
        pytest.param("token_revoke", "multipart/form-data", None, "must be JSON", id="revoke-multipart-no-body"),
        pytest.param(
            "token_revoke",
            "multipart/form-data; boundary=x",
            '--x\r\nContent-Disposition: form-data; name="userId"\r\n\r\nu\r\n--x--',
            "must be JSON",
            id="revoke-multipart",
        ),
        pytest.param("oauth_initiate", "application/x-www-form-urlencoded", "userId=u", "must be JSON", id="form"),
        pytest.param("token_revoke", "application/json", "[null, null]", "must be a JSON object", id="array-of-nulls"),
        pytest.param("token_revoke", "application/json", "null", "must be a JSON object", id="json-null"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused_and_changes_nothing(
    world: ServiceWorld, function: str, content_type: str, body: str | None, message: str
) -> None:
    event = _with(
        SAMPLES[function],
        headers={"Content-Type": content_type},
        multiValueHeaders={"Content-Type": [content_type]},
        body=body,
    )
    answer = world.invoke(function, event)  # the revoke sample names the fuzz world's user in its query
    assert answer["statusCode"] == 400, answer
    error = json.loads(answer["body"])["error"]
    assert error["code"] == "invalid_request"
    assert message in error["message"]
    assert world.row() is not None
