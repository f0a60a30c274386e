"""The API Gateway way in: Powertools' REST resolver, answering every failure in the edge's shape.

Imported on the first API event only (through :class:`token_manager.edge.ApiRoutes`, or
``edge.ServiceApi``): the resolver with its OpenAPI validation costs about 100 ms at cold
start, which a direct invoke or a scheduled run never needs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from token_manager.edge import FIELD_NAME, JSON_CONTENT_TYPE, JSON_HEADERS, refuse
from token_manager.errors import InvalidRequest, TokenServiceError
from token_manager.observability import count_error

__all__ = ["ServiceApi", "json_answer", "json_refusal", "resolver_for"]

logger = logging.getLogger(__name__)

# What a route's annotations may name without the handler importing Powertools at run time
# (handlers import these under TYPE_CHECKING): resolved with Powertools' own when registered.
ROUTE_ANNOTATION_NAMES: Final[Mapping[str, Any]] = {"Body": Body, "Query": Query, "Response": Response}


def json_answer(body: Mapping[str, Any], status: int = 200) -> Response[str]:
    return Response(
        status_code=status,
        content_type=JSON_CONTENT_TYPE,
        body=json.dumps(body, separators=(",", ":")),
        headers=dict(JSON_HEADERS),
    )


def json_refusal(error: TokenServiceError) -> Response[str]:
    return json_answer(error.to_body(), status=error.status)


def resolver_for(
    routes: Sequence[tuple[str, str, Callable[..., Any]]],
    *,
    refuse_with: Callable[[TokenServiceError], Response[str]] | None = None,
) -> ServiceApi:
    """A resolver answering ``routes`` (rule, method, function), declared before Powertools was loaded."""
    api = ServiceApi(refuse=refuse_with or json_refusal)
    for rule, method, function in routes:
        # Powertools reads the parameters' Query()/Body() from the annotations; with postponed
        # evaluation they are text naming what the handler imported only for the type checker.
        function.__annotations__ = typing.get_type_hints(function, localns=ROUTE_ANNOTATION_NAMES, include_extras=True)
        api.route(rule, method)(function)
    return api


class ServiceApi(APIGatewayRestResolver):
    """Powertools' REST resolver with validation, answering every failure in our shape.

    Validation failures (Powertools' 422) become 400 ``invalid_request`` naming the
    field; an unknown route is 404 and a known path with another method is 405, both in
    our error body; a body that is not UTF-8 or not JSON is 400. ``refuse`` shapes the
    refusal (JSON by default; the OAuth callback answers a browser instead).
    """

    def __init__(self, *, refuse: Callable[[TokenServiceError], Response[str]] = json_refusal) -> None:
        super().__init__(enable_validation=True, json_body_deserializer=_parse_json_body)
        self._refuse_with = refuse
        self._methods_by_path: dict[str, set[str]] = {}
        self.exception_handler(Exception)(self._on_exception)

    def route(self, rule: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        methods = [method] if isinstance(method, str) else list(method)
        self._methods_by_path.setdefault(rule, set()).update(str(m).upper() for m in methods)
        return super().route(rule, method, *args, **kwargs)

    def answer(self, event: Mapping[str, Any], context: object) -> dict[str, Any]:
        """Resolve an API Gateway REST proxy event into a proxy response; never raises."""
        problem = _proxy_event_problem(event)
        if problem is not None:
            return _proxy_response(self._refuse_with(refuse(problem)))
        try:
            return self.resolve(event, context)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a failure outside the routes still gets our answer
            return _proxy_response(self._refuse_with(refuse(exc)))

    def _on_exception(self, exc: Exception) -> Response[str]:
        if isinstance(exc, NotFoundError):
            return self._not_routed()
        return self._refuse_with(refuse(exc))

    def _not_routed(self) -> Response[str]:
        method = self.current_event.http_method.upper()
        allowed = self._methods_by_path.get(self.current_event.path)
        if not allowed:
            count_error("not_found")
            return json_answer({"error": {"code": "not_found", "message": "No such route."}}, status=404)
        count_error("method_not_allowed")
        logger.info("method not allowed", extra={"method": method[:16]})
        response = json_answer(
            {"error": {"code": "method_not_allowed", "message": "This route does not accept that method."}},
            status=405,
        )
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response


def _parse_json_body(text: str) -> Any:
    """json.loads, with every way a body can fail reported as a JSON error (so 400, not 500)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError):  # e.g. absurd nesting, or an integer past Python's digit limit
        raise json.JSONDecodeError("unparseable JSON", "", 0) from None


# How API Gateway shapes a REST proxy event's parts; an event shaped otherwise did not
# come from it, and is refused before the resolver trips over a header that is a list.
_TEXT_MAPS: Final = ("headers", "queryStringParameters", "pathParameters", "stageVariables")
_TEXT_LIST_MAPS: Final = ("multiValueHeaders", "multiValueQueryStringParameters")
# Media types Powertools parses into fields whenever they are declared, body or not.
_PARSED_EVEN_WITHOUT_BODY: Final = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


def _proxy_event_problem(event: Mapping[str, Any]) -> InvalidRequest | None:
    if not isinstance(event.get("httpMethod"), str) or not isinstance(event.get("path"), str):
        return InvalidRequest("The API Gateway event has no method or path.")
    if not _shaped_like_api_gateway(event):
        return InvalidRequest("The API Gateway event is malformed.")
    return _repeated_query_problem(event) or _body_problem(event)


def _repeated_query_problem(event: Mapping[str, Any]) -> InvalidRequest | None:
    """A query parameter given twice (``?userId=a&userId=b``) is ambiguous: refuse it by name.

    The resolver would see a list and answer "userId must be a string", which misleads.
    """
    for name, values in (event.get("multiValueQueryStringParameters") or {}).items():
        if len(values) > 1:
            shown = name if FIELD_NAME.fullmatch(name) else "A query parameter"
            return InvalidRequest(f"{shown} must be given once.")
    return None


def _body_problem(event: Mapping[str, Any]) -> InvalidRequest | None:
    """Bodies are JSON objects, declared as JSON or not declared at all.

    Powertools would otherwise parse a form or multipart body into fields (a multipart
    type without a boundary failed as a bug), and reads some non-object JSON as no body.
    """
    body = event.get("body")
    for content_type in _declared_content_types(event):
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type and media_type != JSON_CONTENT_TYPE and (body or media_type in _PARSED_EVEN_WITHOUT_BODY):
            return InvalidRequest("The request body must be JSON (Content-Type: application/json).")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return InvalidRequest("The request body is not text.")
    try:
        text = base64.b64decode(body, validate=True).decode("utf-8") if event.get("isBase64Encoded") else body
        text.encode("utf-8")  # lone surrogates cannot be UTF-8
    except (binascii.Error, ValueError):  # UnicodeError is a ValueError
        return InvalidRequest("The request body is not valid UTF-8 JSON.")
    try:
        parsed = _parse_json_body(text)
    except json.JSONDecodeError:
        return None  # the resolver answers it, naming the problem
    if not isinstance(parsed, dict):
        return InvalidRequest("The request body must be a JSON object.")
    return None


def _declared_content_types(event: Mapping[str, Any]) -> list[str]:
    found = [value for name, value in (event.get("headers") or {}).items() if name.lower() == "content-type"]
    for name, values in (event.get("multiValueHeaders") or {}).items():
        if name.lower() == "content-type":
            found.extend(values)
    return found


def _shaped_like_api_gateway(event: Mapping[str, Any]) -> bool:
    def text_map(value: object) -> bool:
        return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    def text_list_map(value: object) -> bool:
        return isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(item, str) for item in v)
            for k, v in value.items()
        )

    return (
        all(event.get(name) is None or text_map(event[name]) for name in _TEXT_MAPS)
        and all(event.get(name) is None or text_list_map(event[name]) for name in _TEXT_LIST_MAPS)
        and (event.get("requestContext") is None or isinstance(event["requestContext"], Mapping))
        and event.get("isBase64Encoded") in (None, True, False)
    )


def _proxy_response(response: Response[str]) -> dict[str, Any]:
    """A Powertools Response as a REST proxy answer (for refusals made outside ``resolve``)."""
    headers: dict[str, list[str]] = {}
    for name, value in response.headers.items():
        headers[name] = list(value) if isinstance(value, list) else [value]
    if response.content_type and "Content-Type" not in headers:
        headers["Content-Type"] = [response.content_type]
    body = response.body if isinstance(response.body, str) else json.dumps(response.body)
    return {"statusCode": response.status_code, "multiValueHeaders": headers, "body": body, "isBase64Encoded": False}
