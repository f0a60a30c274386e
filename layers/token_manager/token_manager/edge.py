"""The service's edge: request models, the one place errors become answers, and answer shapes.

Two ways in, one error taxonomy (DESIGN.md section 3):

- API Gateway REST proxy events go through :class:`ServiceApi` (Powertools'
  ``APIGatewayRestResolver`` with validation, in :mod:`token_manager.api_resolver`):
  status + ``{"error": {"code", "message"}}``. Handlers declare their routes on
  :class:`ApiRoutes`, which loads the resolver only when the first API event arrives.
- The router's direct payloads go through :func:`answer_direct`:
  ``{"error": {"code", "message", "status"}}``. Nothing on this way imports
  Powertools' event handler.

Whatever goes wrong, the caller gets one of the taxonomy's answers (an unexpected bug is
``internal_error`` 500): never a stack trace, an input value, a secret or a hostname.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from token_manager.errors import (
    ConfigurationError,
    InvalidRequest,
    KeyRingError,
    TokenDecryptionError,
    TokenServiceError,
)
from token_manager.models import ID_PATTERN, MAX_ID_CHARS
from token_manager.observability import count_error

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler import Response

    from token_manager.api_resolver import ServiceApi, json_answer, json_refusal
    from token_manager.manager import AccessToken, AuthorizationRequest, RevokeResult

__all__ = [
    "ID_PATTERN",
    "JSON_CONTENT_TYPE",
    "JSON_HEADERS",
    "MAX_ID_CHARS",
    "MAX_URI_CHARS",
    "AnswersApiEvents",
    "ApiRoutes",
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
    "refuse",
    "revoke_answer",
    "serve",
    "service_error_for",
]

logger = logging.getLogger(__name__)

MAX_URI_CHARS: Final = 2048
JSON_CONTENT_TYPE: Final = "application/json"
# Answers may carry an access token: no browser, proxy or CDN may keep a copy.
JSON_HEADERS: Final[Mapping[str, str]] = {"Cache-Control": "no-store"}

# Field names in validation messages come from our models; anything else is not echoed.
FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_MAX_PROBLEMS_NAMED = 3
# Where the resolver's validation failures are defined; loaded only with the resolver.
_POWERTOOLS_VALIDATION: Final = "aws_lambda_powertools.event_handler.openapi.exceptions"
# Names served by token_manager.api_resolver, imported on first use (see __getattr__).
_RESOLVER_NAMES: Final = frozenset({"ServiceApi", "json_answer", "json_refusal"})

RouteT = TypeVar("RouteT", bound=Callable[..., Any])


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # Unknown fields are ignored (callers may send more than we read); inputs never
    # appear in a validation error's text.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, hide_input_in_errors=True)


_Id = Field(strict=True, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
UserId = Annotated[str, _Id, Field(alias="userId")]
HouseholdId = Annotated[str | None, _Id, Field(alias="householdId")]


class FetchRequest(_Request):
    """``{"userId", "householdId"?, "correlationId"?}``"""

    user_id: UserId
    household_id: HouseholdId = None
    correlation_id: Annotated[str | None, Field(alias="correlationId", strict=True, max_length=MAX_ID_CHARS)] = None


class RevokeRequest(_Request):
    """``{"userId", "householdId"?}``"""

    user_id: UserId
    household_id: HouseholdId = None


class InitiateRequest(_Request):
    """``{"userId", "redirectUri"?}``"""

    user_id: UserId
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


# --------------------------------------------------------------------------- errors


def service_error_for(exc: BaseException) -> TokenServiceError:
    """The one mapping from anything raised to the taxonomy. Unexpected bugs are logged
    by exception class and code location only (their text may hold data)."""
    if isinstance(exc, TokenServiceError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return invalid_request_from(exc.errors(include_input=False, include_url=False))
    # Only the API resolver raises these; when it was never loaded, nothing can be one.
    validation = sys.modules.get(_POWERTOOLS_VALIDATION)
    if validation is not None and isinstance(exc, validation.RequestValidationError):
        return invalid_request_from(list(exc.errors()))
    if validation is not None and isinstance(exc, validation.RequestUnsupportedContentType):
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
    names = [part for part in location if part not in ("body", "query") and FIELD_NAME.fullmatch(part)]
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


def refuse(exc: BaseException) -> TokenServiceError:
    """The taxonomy's error for ``exc``, counted and logged (by code and status only)."""
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
        return refuse(exc).to_direct_body()


class AnswersApiEvents(Protocol):
    def answer(self, event: Mapping[str, Any], context: object) -> dict[str, Any]: ...


def serve(
    event: object,
    context: object,
    *,
    api: AnswersApiEvents | None = None,
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


class ApiRoutes:
    """A function's REST routes: declared at import, handed to :class:`ServiceApi` on the first API event.

    Powertools' resolver and its OpenAPI validation cost about 100 ms at cold start, and
    a direct invoke or a scheduled run never needs them. Route functions name ``Query``,
    ``Body`` and ``Response`` in their annotations, imported under ``TYPE_CHECKING``
    only; they are resolved to Powertools' own when the resolver is built.

    >>> api = ApiRoutes()                                     # doctest: +SKIP
    >>> @api.get("/sonos/token")                              # doctest: +SKIP
    ... def fetch_over_api(user_id: Annotated[str, Query(alias="userId")]) -> Response[str]: ...
    """

    def __init__(self, *, refuse: Callable[[TokenServiceError], Response[str]] | None = None) -> None:
        self._refuse_with = refuse
        self._routes: list[tuple[str, str, Callable[..., Any]]] = []
        self._resolver: ServiceApi | None = None
        self._lock = threading.Lock()

    def get(self, rule: str) -> Callable[[RouteT], RouteT]:
        return self._declare(rule, "GET")

    def post(self, rule: str) -> Callable[[RouteT], RouteT]:
        return self._declare(rule, "POST")

    def delete(self, rule: str) -> Callable[[RouteT], RouteT]:
        return self._declare(rule, "DELETE")

    def resolver(self) -> ServiceApi:
        """The resolver for these routes, built once (a failed build is tried again next time)."""
        with self._lock:
            if self._resolver is None:
                from token_manager.api_resolver import resolver_for

                self._resolver = resolver_for(self._routes, refuse_with=self._refuse_with)
            return self._resolver

    def answer(self, event: Mapping[str, Any], context: object) -> dict[str, Any]:
        """Resolve an API Gateway REST proxy event into a proxy response; never raises."""
        try:
            resolver = self.resolver()
        except Exception as exc:  # noqa: BLE001 - even without a resolver the caller gets our answer
            error = refuse(exc)
            headers = {name: [value] for name, value in JSON_HEADERS.items()}
            return {
                "statusCode": error.status,
                "multiValueHeaders": {**headers, "Content-Type": [JSON_CONTENT_TYPE]},
                "body": json.dumps(error.to_body(), separators=(",", ":")),
                "isBase64Encoded": False,
            }
        return resolver.answer(event, context)

    def _declare(self, rule: str, method: str) -> Callable[[RouteT], RouteT]:
        def declare(function: RouteT) -> RouteT:
            with self._lock:
                if self._resolver is not None:
                    raise RuntimeError("Routes must be declared before the first API event.")
                self._routes.append((rule, method, function))
            return function

        return declare


def __getattr__(name: str) -> Any:
    # The resolver's side of the edge loads Powertools' event handler: only when asked for.
    if name in _RESOLVER_NAMES:
        from token_manager import api_resolver

        return getattr(api_resolver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
