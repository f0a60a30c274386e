"""docs/openapi.yaml stays honest: valid OpenAPI 3.0, the template's routes and auth exactly,
and every answer the handlers really give (each documented status, produced on the real
services) validates against the document's schema for it."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from openapi_spec_validator import validate as validate_openapi

from devtools.local_api import DEFAULT_TEMPLATE, ServiceDefinition
from tests.support.handlers import header
from tests.support.service_world import USER, ServiceWorld, api_event
from token_manager.errors import ALL_ERRORS

pytestmark = pytest.mark.integration

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
# API Gateway's own refusal of an unsigned call: no function runs, so no handler can produce it.
GATEWAY_ONLY = {("POST", "/sonos/oauth/initiate", 403), ("GET", "/sonos/token", 403), ("DELETE", "/sonos/token", 403)}


def document() -> dict[str, Any]:
    loaded = yaml.safe_load(OPENAPI.read_text())
    assert isinstance(loaded, dict)
    return loaded


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document()["paths"].items()
        for method, operation in item.items()
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }


def test_the_document_is_valid_openapi_3_0() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.0.")
    validate_openapi(spec)


def test_its_paths_and_methods_are_the_template_api_routes() -> None:
    routes = {(route.method, route.path) for route in ServiceDefinition.from_template(DEFAULT_TEMPLATE).routes}
    assert set(operations()) == routes


def test_each_route_documents_the_template_authorizer() -> None:
    for route in ServiceDefinition.from_template(DEFAULT_TEMPLATE).routes:
        security = operations()[(route.method, route.path)]["security"]
        expected: list[dict[str, list[str]]] = [{"sigv4": []}] if route.authorizer == "AWS_IAM" else []
        assert (route.method, route.path, security) == (route.method, route.path, expected)


def test_the_error_codes_are_the_taxonomy() -> None:
    codes = document()["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(codes) == {error.code for error in ALL_ERRORS} | {"internal_error"}


# --------------------------------------------------------------------------- real answers


def _schema_validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # The document's components sit beside the $ref, so "#/components/..." resolves in it.
    root = {**schema, "components": document()["components"]}
    return jsonschema.Draft4Validator(root, format_checker=jsonschema.FormatChecker())


def check_against_document(method: str, path: str, answer: dict[str, Any]) -> tuple[str, str, int]:
    """The answer's status is documented for the operation, with its content type, schema and headers."""
    status = int(answer["statusCode"])
    documented = operations()[(method, path)]["responses"]
    assert str(status) in documented, f"{method} {path} answered an undocumented {status}"
    response = documented[str(status)]
    if "$ref" in response:
        response = document()["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    for name in response.get("headers", {}):
        assert header(answer, name), f"{method} {path} {status} lacks the documented {name} header"
    content = response.get("content", {})
    if not content:
        assert answer["body"] == ""
        return method, path, status
    content_type = (header(answer, "Content-Type") or "").split(";")[0].strip()
    assert content_type in content, f"{method} {path} {status} answered {content_type}"
    schema = content[content_type]["schema"]
    body: Any = json.loads(answer["body"]) if content_type == "application/json" else answer["body"]
    errors = sorted(_schema_validator(schema).iter_errors(body), key=str)
    assert errors == [], f"{method} {path} {status}: {[error.message for error in errors]}"
    return method, path, status


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def answers(world: ServiceWorld) -> Iterator[Callable[[str, str, dict[str, Any]], None]]:
    """Check an answer against the document; afterwards, every documented status was seen."""
    seen: set[tuple[str, str, int]] = set()

    def check(method: str, path: str, answer: dict[str, Any]) -> None:
        seen.add(check_against_document(method, path, answer))

    yield check
    documented = {
        (method, path, int(status))
        for (method, path), operation in operations().items()
        for status in operation["responses"]
    }
    assert documented - GATEWAY_ONLY - seen == set(), "documented answers no scenario produced"


INITIATE = ("POST", "/sonos/oauth/initiate")
CALLBACK = ("GET", "/sonos/oauth/callback")
FETCH = ("GET", "/sonos/token")
REVOKE = ("DELETE", "/sonos/token")


def _initiate(world: ServiceWorld, body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = world.invoke("oauth_initiate", api_event("oauth_initiate_api.json", body=body))
    return answer


def _fetch(world: ServiceWorld, query: dict[str, str] | None) -> dict[str, Any]:
    answer: dict[str, Any] = world.invoke("token_fetch", api_event("token_fetch_api.json", query=query))
    return answer


def _revoke(world: ServiceWorld, query: dict[str, str] | None, body: Any = None) -> dict[str, Any]:
    answer: dict[str, Any] = world.invoke("token_revoke", api_event("token_revoke_api.json", query=query, body=body))
    return answer


def _with_setting(world: ServiceWorld, name: str, value: str) -> None:
    world.monkeypatch.setenv(name, value)
    world.new_container()


def test_every_documented_answer_is_what_the_handlers_give(
    world: ServiceWorld, answers: Callable[[str, str, dict[str, Any]], None]
) -> None:
    household = world.fetch()["householdId"]
    redirect_uri = "http://127.0.0.1:3000/sonos/oauth/callback"

    # initiate
    answers(*INITIATE, _initiate(world, {"userId": USER, "redirectUri": redirect_uri}))
    answers(*INITIATE, _initiate(world, {"redirectUri": redirect_uri}))
    answers(*INITIATE, _initiate(world, {"userId": USER, "redirectUri": "https://evil.test/cb"}))

    # fetch
    answers(*FETCH, _fetch(world, {"userId": USER}))
    answers(*FETCH, _fetch(world, {"userId": USER, "householdId": household}))
    answers(*FETCH, _fetch(world, None))
    answers(*FETCH, _fetch(world, {"userId": "nobody"}))
    answers(*FETCH, _fetch(world, {"userId": USER, "householdId": "Sonos_not_this_account"}))

    # revoke (a user of its own, so USER stays linked)
    other = world.link("user-to-revoke")
    answers(*REVOKE, _revoke(world, {"userId": other.user_id, "householdId": "Sonos_not_this_account"}))
    answers(*REVOKE, _revoke(world, None, {"userId": other.user_id}))
    answers(*REVOKE, _revoke(world, {"userId": other.user_id}))  # again: idempotent
    answers(*REVOKE, _revoke(world, None, "[1, 2]"))

    # the callback, as a page and as redirects
    started = world.initiate()
    answers(*CALLBACK, world.callback(world.consent(started["authorizationUrl"])))
    answers(*CALLBACK, world.callback({"code": "never-issued", "state": "never-issued-state"}))
    world.stand_in.configure(fail_next=3, fail_status=503)
    started = world.initiate()
    answers(*CALLBACK, world.callback(world.consent(started["authorizationUrl"])))
    world.stand_in.configure(invalid_client=True)
    started = world.initiate()
    answers(*CALLBACK, world.callback(world.consent(started["authorizationUrl"])))
    world.stand_in.configure(invalid_client=False)
    _with_setting(world, "SONOS_LINK_SUCCESS_URL", "https://app.example.test/sonos/linked")
    started = world.initiate()
    answers(*CALLBACK, world.callback(world.consent(started["authorizationUrl"])))
    _with_setting(world, "SONOS_LINK_SUCCESS_URL", "")

    # Sonos rejects the grant for good, then is down for an expired one
    world.execute("update sonos_tokens set token_status = 'expired' where user_id = %s", USER)
    world.flush_cache()
    answers(*FETCH, _fetch(world, {"userId": USER}))
    world.link()
    world.expire_in(-1)
    world.stand_in.configure(fail_next=3, fail_status=503)
    answers(*FETCH, _fetch(world, {"userId": USER}))

    # configuration_error: a setting missing
    _with_setting(world, "SONOS_CLIENT_ID", "")
    answers(*INITIATE, _initiate(world, {"userId": USER}))
    answers(*FETCH, _fetch(world, {"userId": USER}))
    answers(*REVOKE, _revoke(world, {"userId": USER}))
    _with_setting(world, "SONOS_CLIENT_ID", "client-id-faults")

    # storage_unavailable: Redis, then Postgres, unreachable
    _with_setting(world, "REDIS_URL", f"redis://127.0.0.1:{_closed_port()}/0")
    answers(*INITIATE, _initiate(world, {"userId": USER}))
    answers(*REVOKE, _revoke(world, {"userId": USER}))
    _with_setting(world, "REDIS_URL", world.redis_url)
    _with_setting(world, "DATABASE_URL", f"postgresql://postgres@127.0.0.1:{_closed_port()}/sonos")
    world.flush_cache()
    answers(*FETCH, _fetch(world, {"userId": USER}))
