"""The service's edge: request models, the one place errors become answers, and answer shapes.

Two ways in, one error taxonomy (DESIGN.md section 3):

- API Gateway REST proxy events go through :class:`ServiceApi` (Powertools'
  ``APIGatewayRestResolver`` with validation): status + ``{"error": {"code", "message"}}``.
- The router's direct payloads go through :func:`answer_direct`:
  ``{"error": {"code", "message", "status"}}``.

Whatever goes wrong, the caller gets one of the taxonomy's answers (an unexpected bug is
``internal_error`` 500): never a stack trace, an input value, a secret or a hostname.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final

import pydantic
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from pydantic import BaseModel, ConfigDict, Field

from token_manager.errors import (
    ConfigurationError,
    InvalidRequest,
    KeyRingError,
    TokenDecryptionError,
    TokenServiceError,
)
from token_manager.observability import count_error

if TYPE_CHECKING:
    from token_manager.manager import AccessToken, AuthorizationRequest, RevokeResult

__all__ = [
    "ID_PATTERN",
    "JSON_HEADERS",
    "MAX_ID_CHARS",
    "MAX_URI_CHARS",
    "FetchRequest",
    "InitiateRequest",
    "RevokeRequest",
    "ServiceApi",
    "answer_direct",
    "fetch_answer",
    "initiate_answer",
    "invalid_request_from",
    "is_api_event",
    "iso_utc",
    "json_answer",
    "json_refusal",
    "revoke_answer",
    "serve",
    "service_error_for",
]

logger = logging.getLogger(__name__)

MAX_ID_CHARS: Final = 256
MAX_URI_CHARS: Final = 2048
# Ids are printable ASCII without spaces (the manager holds the same rule; docs/openapi.yaml's Id).
ID_PATTERN: Final = r"^[!-~]+$"
JSON_CONTENT_TYPE: Final = "application/json"
# Answers may carry an access token: no browser, proxy or CDN may keep a copy.
JSON_HEADERS: Final[Mapping[str, str]] = {"Cache-Control": "no-store"}

# Field names in validation messages come from our models; anything else is not echoed.
_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_MAX_PROBLEMS_NAMED = 3


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # Unknown fields are ignored (callers may send more than we read); inputs never
    # appear in a validation error's text.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, hide_input_in_errors=True)


class FetchRequest(_Request):
    """``{"userId", "householdId"?, "correlationId"?}``"""

    user_id: Annotated[
        str, Field(alias="userId", strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    ]
    household_id: Annotated[
        str | None, Field(alias="householdId", strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    ] = None
    correlation_id: Annotated[str | None, Field(alias="correlationId", strict=True, max_length=MAX_ID_CHARS)] = None


class RevokeRequest(_Request):
    """``{"userId", "householdId"?}``"""

    user_id: Annotated[
        str, Field(alias="userId", strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    ]
    household_id: Annotated[
        str | None, Field(alias="householdId", strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    ] = None


class InitiateRequest(_Request):
    """``{"userId", "redirectUri"?}``"""

    user_id: Annotated[
        str, Field(alias="userId", strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    ]
    redirect_uri: Annotated[
        str | None, Field(alias="redirectUri", strict=True, min_length=1, max_length=MAX_URI_CHARS)
    ] = None


# --------------------------------------------------------------------------- answers


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, to the second (rounded down: never later than the truth)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def fetch_answer(token: AccessToken) -> dict[str, Any]:
    return {
        "accessToken": token.access_token,
        "householdId": token.household_id,
        "householdIds": list(token.household_ids),
        "expiresAt": iso_utc(token.expires_at),
    }


def revoke_answer(result: RevokeResult) -> dict[str, Any]:
    return {"revoked": result.revoked, "providerRevoked": result.provider_revoked}


def initiate_answer(request: AuthorizationRequest) -> dict[str, Any]:
    return {"authorizationUrl": request.authorization_url, "state": request.state, "expiresIn": request.expires_in}


def json_answer(body: Mapping[str, Any], status: int = 200) -> Response[str]:
    return Response(
        status_code=status,
        content_type=JSON_CONTENT_TYPE,
        body=json.dumps(body, separators=(",", ":")),
        headers=dict(JSON_HEADERS),
    )


def json_refusal(error: TokenServiceError) -> Response[str]:
    return json_answer(error.to_body(), status=error.status)


# --------------------------------------------------------------------------- errors


def service_error_for(exc: BaseException) -> TokenServiceError:
    """The one mapping from anything raised to the taxonomy. Unexpected bugs are logged
    by exception class and code location only (their text may hold data)."""
    if isinstance(exc, TokenServiceError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return invalid_request_from(exc.errors(include_input=False, include_url=False))
    if isinstance(exc, RequestValidationError):
        return invalid_request_from(list(exc.errors()))
    if isinstance(exc, RequestUnsupportedContentType):
        return InvalidRequest("The request body must be JSON (Content-Type: application/json).")
    if isinstance(exc, KeyRingError):
        return ConfigurationError("The token key ring is unusable.")
    if isinstance(exc, TokenDecryptionError):
        return ConfigurationError("A stored token cannot be decrypted with the configured key ring.")
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f"{frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno} in {frame[0].name}" if frame else "unknown"
    logger.error("unexpected error", extra={"error": type(exc).__name__, "at": where})
    return TokenServiceError()


def invalid_request_from(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """An ``invalid_request`` naming the offending fields, never their values."""
    problems: list[str] = []
    for error in errors:
        problem = _describe_problem(error)
        if problem not in problems:
            problems.append(problem)
    if not problems:
        return InvalidRequest()
    return InvalidRequest(" ".join(problems[:_MAX_PROBLEMS_NAMED]))


def _describe_problem(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    location = [part for part in error.get("loc", ()) if isinstance(part, str)]
    if kind == "json_invalid":
        return "The request body is not valid JSON."
    if location == ["body"]:
        return "A JSON request body is required." if kind == "missing" else "The request body must be a JSON object."
    names = [part for part in location if part not in ("body", "query") and _FIELD_NAME.fullmatch(part)]
    field = names[-1] if names else "A field"
    limits = error.get("ctx") or {}
    if kind == "missing":
        return f"{field} is required."
    if kind == "string_type":
        return f"{field} must be a string."
    if kind == "string_too_short":
        return f"{field} must not be empty."
    if kind == "string_pattern_mismatch":
        return f"{field} must be printable ASCII without spaces."
    if kind == "string_too_long" and isinstance(limits.get("max_length"), int):
        return f"{field} must be at most {limits['max_length']} characters."
    if kind == "model_attributes_type":
        return "The payload must be a JSON object."
    return f"{field} is invalid."


def _refuse(exc: BaseException) -> TokenServiceError:
    error = service_error_for(exc)
    count_error(error.code)
    log = logger.warning if error.status >= 500 else logger.info
    log("request refused", extra={"code": error.code, "status": error.status})
    return error


# --------------------------------------------------------------------------- direct invoke


def is_api_event(event: object) -> bool:
    """An API Gateway proxy event, as opposed to the router's plain JSON payload."""
    return isinstance(event, Mapping) and ("httpMethod" in event or "requestContext" in event)


def answer_direct(event: object, operation: Callable[[Mapping[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Run ``operation`` on a direct-invoke payload; any failure becomes the direct error body."""
    try:
        if not isinstance(event, Mapping):
            raise InvalidRequest("The payload must be a JSON object.")
        return operation(event)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one of the taxonomy's answers
        return _refuse(exc).to_direct_body()


def serve(
    event: object,
    context: object,
    *,
    api: ServiceApi | None = None,
    direct: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Dispatch an invocation to the API routes or the direct-invoke operation."""
    if is_api_event(event) and api is not None:
        assert isinstance(event, Mapping)
        return api.answer(event, context)
    if direct is None:
        return answer_direct(event, _api_only)
    return answer_direct(event, direct)


def _api_only(payload: Mapping[str, Any]) -> dict[str, Any]:
    raise InvalidRequest("This function answers API Gateway requests only.")


# --------------------------------------------------------------------------- API Gateway


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
            return _proxy_response(self._refuse_with(_refuse(problem)))
        try:
            return self.resolve(event, context)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a failure outside the routes still gets our answer
            return _proxy_response(self._refuse_with(_refuse(exc)))

    def _on_exception(self, exc: Exception) -> Response[str]:
        if isinstance(exc, NotFoundError):
            return self._not_routed()
        return self._refuse_with(_refuse(exc))

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
    return _body_problem(event)


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
