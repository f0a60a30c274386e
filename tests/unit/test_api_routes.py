"""ApiRoutes: routes declared before Powertools is loaded, answered by ServiceApi from the first API event on."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import pytest

from token_manager import edge
from token_manager.edge import MAX_ID_CHARS, ApiRoutes

if TYPE_CHECKING:
    # Only the type checker sees these: the routes below resolve them when the resolver is built.
    from aws_lambda_powertools.event_handler import Response
    from aws_lambda_powertools.event_handler.openapi.params import Body, Query


def api_event(
    method: str, path: str, *, query: dict[str, str] | None = None, body: str | None = None
) -> dict[str, Any]:
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": {},
        "multiValueHeaders": {},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {"requestId": "req-1", "stage": "test", "httpMethod": method, "path": path},
        "body": body,
        "isBase64Encoded": False,
    }


def refusal(answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return answer["statusCode"], json.loads(answer["body"])


def routes() -> ApiRoutes:
    api = ApiRoutes()

    @api.get("/items")
    def get_item(
        user_id: Annotated[str, Query(alias="userId", min_length=1, max_length=MAX_ID_CHARS)],
    ) -> Response[str]:
        return edge.json_answer({"userId": user_id})

    @api.post("/items")
    def post_item(request: Annotated[edge.RevokeRequest, Body()]) -> Response[str]:
        return edge.json_answer({"userId": request.user_id})

    @api.delete("/items")
    def delete_item() -> Response[str]:
        return edge.json_answer({"deleted": True})

    return api


def test_routes_resolve_their_powertools_annotations_when_the_first_api_event_arrives() -> None:
    api = routes()

    got = api.answer(api_event("GET", "/items", query={"userId": "u-1"}), None)
    posted = api.answer(api_event("POST", "/items", body='{"userId": "u-2"}'), None)
    deleted = api.answer(api_event("DELETE", "/items"), None)

    assert (got["statusCode"], json.loads(got["body"])) == (200, {"userId": "u-1"})
    assert (posted["statusCode"], json.loads(posted["body"])) == (200, {"userId": "u-2"})
    assert (deleted["statusCode"], json.loads(deleted["body"])) == (200, {"deleted": True})
    assert got["multiValueHeaders"]["Cache-Control"] == ["no-store"]


def test_the_resolver_validates_declared_routes_and_names_their_methods() -> None:
    api = routes()

    assert refusal(api.answer(api_event("GET", "/items"), None)) == (
        400,
        {"error": {"code": "invalid_request", "message": "userId is required."}},
    )
    assert refusal(api.answer(api_event("POST", "/items", body="[1]"), None)) == (
        400,
        {"error": {"code": "invalid_request", "message": "The request body must be a JSON object."}},
    )
    not_allowed = api.answer(api_event("PATCH", "/items"), None)
    assert not_allowed["statusCode"] == 405
    assert not_allowed["multiValueHeaders"]["Allow"] == ["DELETE, GET, POST"]


def test_the_resolver_is_built_once_per_container() -> None:
    api = routes()
    assert api.resolver() is api.resolver()


def test_a_route_declared_after_the_first_api_event_is_refused() -> None:
    api = routes()
    api.answer(api_event("GET", "/items", query={"userId": "u"}), None)

    def late() -> dict[str, Any]:
        return {}

    with pytest.raises(RuntimeError, match="before the first API event"):
        api.get("/late")(late)


def test_a_resolver_that_cannot_be_built_answers_internal_error_and_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = routes()
    from token_manager import api_resolver

    builds: list[str] = []
    real_resolver_for = api_resolver.resolver_for

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        builds.append("build")
        if len(builds) == 1:
            raise NameError("an annotation names something unknown")
        return real_resolver_for(*args, **kwargs)

    monkeypatch.setattr(api_resolver, "resolver_for", failing_once)
    event = api_event("GET", "/items", query={"userId": "u-1"})

    failed = api.answer(event, None)
    answered = api.answer(event, None)

    assert refusal(failed) == (500, {"error": {"code": "internal_error", "message": "Internal error."}})
    assert failed["multiValueHeaders"]["Cache-Control"] == ["no-store"]
    assert failed["multiValueHeaders"]["Content-Type"] == ["application/json"]
    assert answered["statusCode"] == 200
    assert builds == ["build", "build"]


def test_the_resolver_side_of_the_edge_is_reachable_from_the_edge() -> None:
    from token_manager import api_resolver

    assert edge.ServiceApi is api_resolver.ServiceApi
    assert edge.json_answer is api_resolver.json_answer
    assert edge.json_refusal is api_resolver.json_refusal
    with pytest.raises(AttributeError, match="no_such_name"):
        edge.no_such_name  # noqa: B018 - the attribute lookup is the test
