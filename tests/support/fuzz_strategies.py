"""Hypothesis strategies for bad input: direct payloads and API Gateway proxy events, wrong in every way.

Every generated value is JSON (what Lambda can deliver). Strings often carry
:data:`INPUT_MARKER`, so a test can tell whether an answer echoes its input.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.support.handlers import load_event

# Bounded so the whole fuzz suite stays well under a minute (FUZZ_MAX_EXAMPLES=2000 digs
# deeper). A test's examples share one world on purpose (a warm container fed one bad input
# after another): hence the fixture health check.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_MAX_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

INPUT_MARKER = "FUZZ-MARKER-7d1e"
ONE_MEGABYTE = 1024 * 1024

ROUTE_PATHS = ("/sonos/oauth/initiate", "/sonos/oauth/callback", "/sonos/token")
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "get", "")
EVENT_FIELDS = (
    "resource",
    "path",
    "httpMethod",
    "headers",
    "multiValueHeaders",
    "queryStringParameters",
    "multiValueQueryStringParameters",
    "pathParameters",
    "stageVariables",
    "requestContext",
    "body",
    "isBase64Encoded",
)
QUERY_NAMES = ("userId", "householdId", "code", "state", "error", "redirectUri")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

# Text a caller might send as an id, a URI, a code or a state; the marker shows echoes.
odd_texts = st.sampled_from(
    [
        "",
        " ",
        "a",
        "u" * 256,
        "u" * 257,
        "has space",
        "\x00",
        "\ud800",  # a lone surrogate: not encodable as UTF-8
        "💥",
        "../../etc/passwd",
        "'; drop table sonos_tokens; --",
        "%00",
        "\r\nSet-Cookie: x=1",
        "<script>alert(1)</script>",
        "Sonos_" + "x" * 40,
        "https://evil.test/cb",
        "http://127.0.0.1:3000/sonos/oauth/callback",
        INPUT_MARKER,
    ]
)
texts = st.one_of(
    odd_texts,
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    st.builds(lambda a, b: a + INPUT_MARKER + b, st.text(max_size=8), st.text(max_size=8)),
)
# The connected user of the fuzz world shows up now and then, so some inputs reach a grant.
id_values = st.one_of(texts, json_values, st.just("7c9e6679-7425-40de-944b-e07fc1f90ae7"))


def payloads(fields: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """A direct-invoke payload: any JSON, or an object with the given fields set to anything."""
    objects = st.fixed_dictionaries(
        {},
        optional={
            **dict.fromkeys(fields, id_values),
            "correlationId": id_values,
            "extra": json_values,
            "httpMethod": json_values,  # a payload that looks like an API event
            "requestContext": json_values,
        },
    )
    return st.one_of(objects, json_values)


def _bodies() -> st.SearchStrategy[Any]:
    request_objects = st.fixed_dictionaries({}, optional=dict.fromkeys(QUERY_NAMES, id_values))
    return st.one_of(
        st.none(),
        st.just(""),
        texts,
        st.builds(json.dumps, json_values),
        st.builds(json.dumps, request_objects),
        st.just("[" * 100_000),
        st.just('{"userId":' * 50_000),
        st.just("9" * 5_000),
        st.just(json.dumps({"userId": "u" * ONE_MEGABYTE})),
        st.just(" " * ONE_MEGABYTE + "{}"),
        json_values.filter(lambda value: not isinstance(value, str) and value is not None),  # a body that is not text
    )


def _headers() -> st.SearchStrategy[Any]:
    content_types = st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "application/json; charset=latin-1",
            "",
        ]
    )
    known = st.sampled_from(["Content-Type", "content-type", "Accept", "X-Forwarded-For", "Host"])
    names = known | st.text(max_size=10)
    return st.one_of(
        st.none(),
        st.dictionaries(names, st.one_of(content_types, texts), max_size=4),
        st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        json_values,
    )


def _multi_headers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=12), st.lists(texts, max_size=3), max_size=4),
        st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        json_values,
    )


def _queries() -> st.SearchStrategy[Any]:
    names = st.sampled_from(QUERY_NAMES) | st.text(max_size=8)
    return st.one_of(
        st.none(),
        st.dictionaries(names, texts, max_size=4),
        st.dictionaries(names, json_values, max_size=3),
        json_values,
    )


def _multi_queries() -> st.SearchStrategy[Any]:
    names = st.sampled_from(QUERY_NAMES) | st.text(max_size=8)
    return st.one_of(
        st.none(),
        st.dictionaries(names, st.lists(texts, max_size=3), max_size=4),
        st.dictionaries(names, json_values, max_size=3),
        json_values,
    )


def _request_contexts() -> st.SearchStrategy[Any]:
    parts = st.fixed_dictionaries(
        {},
        optional={
            "requestId": id_values,
            "stage": id_values,
            "identity": st.one_of(st.none(), json_values, st.fixed_dictionaries({}, optional={"sourceIp": texts})),
            "httpMethod": id_values,
            "resourcePath": id_values,
        },
    )
    return st.one_of(st.none(), parts, json_values)


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "resource": st.one_of(st.sampled_from(ROUTE_PATHS), texts, json_values),
    "path": st.one_of(
        st.sampled_from([*ROUTE_PATHS, "/", "", "/sonos/token/", "//sonos/token", "/SONOS/TOKEN", "/sonos"]),
        texts,
        json_values,
    ),
    "httpMethod": st.one_of(st.sampled_from(METHODS), texts, json_values),
    "headers": _headers(),
    "multiValueHeaders": _multi_headers(),
    "queryStringParameters": _queries(),
    "multiValueQueryStringParameters": _multi_queries(),
    "pathParameters": st.one_of(st.none(), json_values),
    "stageVariables": st.one_of(st.none(), json_values),
    "requestContext": _request_contexts(),
    "body": _bodies(),
    "isBase64Encoded": st.one_of(st.booleans(), json_values),
}


def _mutated(base: dict[str, Any], changes: dict[str, Any], dropped: frozenset[str]) -> dict[str, Any]:
    event = {name: value for name, value in base.items() if name not in dropped}
    event.update(changes)
    return event


def api_events(sample_file: str) -> st.SearchStrategy[dict[str, Any]]:
    """A sample API Gateway event (events/<sample_file>) with some fields replaced or removed."""
    base = load_event(sample_file)
    changes = st.fixed_dictionaries({}, optional=FIELD_VALUES)
    dropped = st.frozensets(st.sampled_from(EVENT_FIELDS), max_size=3)
    return st.builds(_mutated, st.just(base), changes, dropped)


def base64_bodies(sample_file: str) -> st.SearchStrategy[dict[str, Any]]:
    """The sample event with ``isBase64Encoded`` and a base64 body of any bytes (mostly not UTF-8 JSON)."""
    base = load_event(sample_file)

    def encoded(raw: bytes) -> dict[str, Any]:
        return {**base, "body": base64.b64encode(raw).decode(), "isBase64Encoded": True}

    raw_bytes = st.one_of(
        st.binary(max_size=64),
        st.builds(lambda tail: b'{"userId": "' + tail + b'"}', st.binary(min_size=1, max_size=8)),
        st.just(b"\xff\xfe" + '{"userId":"u"}'.encode("utf-16-le")),
    )
    return st.builds(encoded, raw_bytes)
