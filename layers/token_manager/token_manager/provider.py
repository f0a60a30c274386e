"""Sonos HTTP: authorize URL, code exchange, refresh, households and revoke, with failures classified once."""

from __future__ import annotations

import logging
import math
import random as _random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Final
from urllib.parse import quote, urlencode

import pydantic
import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.util.retry import Retry

from token_manager._backoff import full_jitter_delay, retry_after_seconds
from token_manager.errors import ConfigurationError
from token_manager.provider_errors import (
    SonosClientRejected,
    SonosError,
    SonosGrantRejected,
    SonosInvalidResponse,
    SonosUnavailable,
    sanitize_error_code,
)

# The SonosError family lives in provider_errors (importable without requests), re-exported here.
__all__ = [
    "AUTHORIZE_PATH",
    "HOUSEHOLDS_PATH",
    "MAX_EXPIRES_IN_SECONDS",
    "TOKEN_PATH",
    "Operation",
    "Outcome",
    "SonosClient",
    "SonosClientConfig",
    "SonosClientRejected",
    "SonosError",
    "SonosGrantRejected",
    "SonosInvalidResponse",
    "SonosUnavailable",
    "TokenResponse",
    "classify",
    "provider_error_code",
    "sanitize_error_code",
]

logger = logging.getLogger(__name__)

AUTHORIZE_PATH: Final = "/login/v3/oauth"
TOKEN_PATH: Final = "/login/v3/oauth/access"  # noqa: S105 - a URL path, not a secret
HOUSEHOLDS_PATH: Final = "/households"

# A token response promising more than ten years is not a usable expiry: beyond the nonsense,
# adding it to "now" can overflow datetime arithmetic downstream.
MAX_EXPIRES_IN_SECONDS: Final = 10 * 365 * 24 * 3600

_EXPIRES_IN_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SonosClientConfig:
    """Where and how to reach Sonos. Built by settings; ``client_secret`` never shows in a repr."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_base_url: str = "https://api.sonos.com"
    control_base_url: str = "https://api.ws.sonos.com/control/api/v1"
    scope: str = "playback-control-all"
    revoke_url: str = ""
    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    max_attempts: int = 3
    backoff_base_seconds: float = 0.25
    backoff_cap_seconds: float = 2.0
    retry_after_cap_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name in ("client_id", "client_secret", "auth_base_url", "control_base_url", "scope"):
            if not getattr(self, name).strip():
                raise ConfigurationError(f"Sonos client setting {name} is empty.")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"Sonos client setting {name} must be a positive number of seconds.")
        for name in ("backoff_base_seconds", "backoff_cap_seconds", "retry_after_cap_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"Sonos client setting {name} must be zero or more seconds.")
        if isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ConfigurationError("Sonos client setting max_attempts must be at least 1.")

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``(connect, read)`` pair passed to every request."""
        return (self.connect_timeout, self.read_timeout)


# --------------------------------------------------------------------------- token response


def _parse_expires_in(value: object) -> int:
    # bool is an int in Python, and `true` is not a number of seconds.
    if value is None or isinstance(value, bool):
        raise ValueError("expires_in must be a number of seconds")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("expires_in must be finite")
        seconds = int(value)  # rounding down errs towards refreshing early
    elif isinstance(value, str) and _EXPIRES_IN_TEXT.fullmatch(value.strip()):
        seconds = int(float(value.strip()))
    else:
        raise ValueError("expires_in must be a number of seconds")
    if seconds <= 0:
        raise ValueError("expires_in must be positive")
    if seconds > MAX_EXPIRES_IN_SECONDS:
        raise ValueError("expires_in is implausibly large")
    return seconds


def _require_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _absent_when_blank(value: object) -> object:
    # Sonos may omit the refresh token, send null, or send "": all mean "keep the one you have".
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def _optional_text(value: object) -> str | None:
    # Informational fields must not sink an otherwise usable token response.
    return value if isinstance(value, str) and value.strip() else None


def _bearer_when_unusable(value: object) -> object:
    return value if isinstance(value, str) and value.strip() else "Bearer"


class TokenResponse(pydantic.BaseModel):
    """The useful part of a Sonos token response. Token values never appear in repr/str or errors.

    >>> TokenResponse.model_validate({"access_token": "a", "expires_in": "86399", "refresh_token": ""}).expires_in
    86399
    """

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    access_token: Annotated[str, pydantic.AfterValidator(_require_text)] = pydantic.Field(repr=False)
    token_type: Annotated[str, pydantic.BeforeValidator(_bearer_when_unusable)] = "Bearer"  # noqa: S105
    refresh_token: Annotated[str | None, pydantic.BeforeValidator(_absent_when_blank)] = pydantic.Field(
        default=None, repr=False
    )
    expires_in: Annotated[int, pydantic.BeforeValidator(_parse_expires_in)]
    scope: Annotated[str | None, pydantic.BeforeValidator(_optional_text)] = None


# --------------------------------------------------------------------------- classification


class Operation(StrEnum):
    EXCHANGE_CODE = "exchange_code"
    REFRESH = "refresh"
    LIST_HOUSEHOLDS = "list_households"
    REVOKE = "revoke"


class Outcome(StrEnum):
    """What one attempt's result means for the caller; decided only by :func:`classify`."""

    OK = "ok"
    TRANSIENT = "transient"  # retry with backoff; the grant stays as it is
    GRANT_REJECTED = "grant_rejected"  # permanent for the grant: no retry, the user must reconnect
    CLIENT_REJECTED = "client_rejected"  # our configuration: no retry, keep the grant
    UNSUPPORTED = "unsupported"  # revoke only: the endpoint does not exist


_TOKEN_ENDPOINT_OPERATIONS: Final = frozenset({Operation.EXCHANGE_CODE, Operation.REFRESH})
_TRANSPORT_TRANSIENT: Final = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)


def provider_error_code(response: requests.Response) -> str | None:
    """The error code in an error body, whatever its shape; ``None`` for text, empty or unknown bodies.

    Sonos has answered 401s with ``{"error": ...}``, with an Apigee ``{"fault": {"detail":
    {"errorcode": ...}}}`` and with plain text, so nothing here may assume one of them.
    """
    try:
        body = response.json()
    except ValueError:  # requests' JSONDecodeError, and bodies that are not text at all
        return None
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping):
        error = error.get("code")
    if isinstance(error, str):
        return sanitize_error_code(error)
    fault = body.get("fault")
    if isinstance(fault, Mapping):
        detail = fault.get("detail")
        if isinstance(detail, Mapping):
            return sanitize_error_code(detail.get("errorcode"))
    return sanitize_error_code(body.get("errorCode"))  # the Control API's own error shape


def classify(result: requests.Response | requests.RequestException, operation: Operation) -> Outcome:
    """The single place that decides what a Sonos answer (or a transport failure) means.

    Keyed on the status code; the error body only separates ``invalid_client`` (our
    configuration) from a rejected grant. Anything we did not expect is treated as our
    configuration: it keeps the user's grant and does not hammer Sonos with retries.
    """
    if isinstance(result, requests.RequestException):
        # Other request errors (invalid URL, missing schema, bad header) are ours to fix.
        return Outcome.TRANSIENT if isinstance(result, _TRANSPORT_TRANSIENT) else Outcome.CLIENT_REJECTED
    status = result.status_code
    if 200 <= status < 300:
        return Outcome.OK
    if status in (408, 429) or status >= 500:
        return Outcome.TRANSIENT
    if status in (400, 401) and provider_error_code(result) == "invalid_client":
        return Outcome.CLIENT_REJECTED
    if operation in _TOKEN_ENDPOINT_OPERATIONS and status in (400, 401):
        return Outcome.GRANT_REJECTED
    if operation is Operation.LIST_HOUSEHOLDS and status in (401, 403):
        return Outcome.GRANT_REJECTED
    if operation is Operation.REVOKE and status in (404, 405):
        return Outcome.UNSUPPORTED
    return Outcome.CLIENT_REJECTED


# --------------------------------------------------------------------------- client


class _BearerAuth(AuthBase):
    """Bearer auth as a requests auth object, so ``~/.netrc`` can never replace it and no repr shows it."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


@dataclass(frozen=True)
class _CallResult:
    """How a call ended: the last attempt's outcome, what it got back, and how many attempts it took."""

    outcome: Outcome
    attempts: int
    response: requests.Response | None = None
    transport_error: str | None = None  # the exception's class name only: its text may carry a URL

    @property
    def status(self) -> int | None:
        return self.response.status_code if self.response is not None else None

    @property
    def error_code(self) -> str | None:
        return provider_error_code(self.response) if self.response is not None else None

    def describe(self) -> str:
        if self.response is None:
            return self.transport_error or "transport error"
        code = self.error_code
        return f"HTTP {self.status}" + (f" {code}" if code else "")


def _new_session() -> requests.Session:
    session = requests.Session()
    # Retries are ours alone (classified, jittered, counted); urllib3 must not add its own.
    no_retries = Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0, raise_on_status=False)
    # The refresher calls from up to REFRESHER_CONCURRENCY threads; urllib3's default pool of 10
    # would open and discard a connection per extra thread. Connections open lazily, so this is free.
    adapter = HTTPAdapter(max_retries=no_retries, pool_connections=4, pool_maxsize=64)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class SonosClient:
    """The Sonos cloud as four calls. Failures come out as :class:`SonosError` subclasses.

    ``sleep`` and ``random`` are injected so tests never wait; ``session`` lets a caller share
    a pooled session (it is then the caller's to configure and close).
    """

    def __init__(
        self,
        config: SonosClientConfig,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._config = config
        self._owns_session = session is None
        self._session = session if session is not None else _new_session()
        self._sleep = sleep
        self._random = random
        self._client_auth = HTTPBasicAuth(config.client_id, config.client_secret)
        self._token_url = config.auth_base_url.rstrip("/") + TOKEN_PATH
        self._authorize_url = config.auth_base_url.rstrip("/") + AUTHORIZE_PATH
        self._households_url = config.control_base_url.rstrip("/") + HOUSEHOLDS_PATH

    def __repr__(self) -> str:
        return f"SonosClient(client_id={self._config.client_id!r}, auth_base_url={self._config.auth_base_url!r})"

    def close(self) -> None:
        """Close the session this client created (a session passed in is left to its owner)."""
        if self._owns_session:
            self._session.close()

    # -- the four calls ------------------------------------------------------------------

    def authorize_url(self, *, state: str, redirect_uri: str) -> str:
        """The Sonos login page for this user. ``redirect_uri`` is sent exactly as registered."""
        query = urlencode(
            {
                "client_id": self._config.client_id,
                "response_type": "code",
                "state": state,
                "scope": self._config.scope,
                "redirect_uri": redirect_uri,
            },
            quote_via=quote,
            safe="",
        )
        return f"{self._authorize_url}?{query}"

    def exchange_code(self, code: str, redirect_uri: str) -> TokenResponse:
        """Trade an authorization code for tokens. ``redirect_uri`` must be the one sent to authorize."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        return self._token_request(Operation.EXCHANGE_CODE, form)

    def refresh(self, refresh_token: str) -> TokenResponse:
        """New tokens for a grant. The response's ``refresh_token`` is ``None`` when Sonos did not rotate it."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self._token_request(Operation.REFRESH, form)

    def list_households(self, access_token: str) -> list[str]:
        """The household ids the grant sees, in Sonos's order; empty for an account with none yet."""
        result = self._call(Operation.LIST_HOUSEHOLDS, "GET", self._households_url, auth=_BearerAuth(access_token))
        response = self._raise_unless_ok(Operation.LIST_HOUSEHOLDS, result)
        return _household_ids(response)

    def revoke(self, token: str) -> bool:
        """Best-effort revocation; ``True`` only when Sonos confirmed it. Never raises.

        Sonos publishes no revocation endpoint, so with no ``revoke_url`` this makes no request.
        """
        if not self._config.revoke_url:
            return False
        try:
            result = self._call(
                Operation.REVOKE, "POST", self._config.revoke_url, auth=self._client_auth, data={"token": token}
            )
        except Exception:  # noqa: BLE001 - revoke is best effort by contract; the row is deleted regardless
            logger.warning("Sonos revoke failed unexpectedly; treating the token as not revoked")
            return False
        if result.outcome is Outcome.OK:
            return True
        if result.outcome is Outcome.UNSUPPORTED:
            logger.info("Sonos revoke endpoint is not supported (%s); token not revoked", result.describe())
        else:
            logger.warning(
                "Sonos revoke failed: %s (%s) after %d attempt(s); token not revoked",
                result.outcome,
                result.describe(),
                result.attempts,
            )
        return False

    # -- plumbing ------------------------------------------------------------------------

    def _token_request(self, operation: Operation, form: dict[str, str]) -> TokenResponse:
        result = self._call(operation, "POST", self._token_url, auth=self._client_auth, data=form)
        response = self._raise_unless_ok(operation, result)
        return _token_response(operation, response)

    def _call(
        self,
        operation: Operation,
        method: str,
        url: str,
        *,
        auth: AuthBase,
        data: dict[str, str] | None = None,
    ) -> _CallResult:
        """Up to ``max_attempts`` tries; only transient outcomes are tried again."""
        max_attempts = self._config.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._session.request(
                    method,
                    url,
                    data=data,
                    auth=auth,
                    headers={"Accept": "application/json"},
                    timeout=self._config.timeout,
                    allow_redirects=False,  # a redirect would be a misconfigured URL, never a place to send secrets
                )
            except requests.RequestException as exc:
                result = _CallResult(classify(exc, operation), attempt, transport_error=type(exc).__name__)
            else:
                result = _CallResult(classify(response, operation), attempt, response=response)
            if result.outcome is not Outcome.TRANSIENT or attempt >= max_attempts:
                return result
            delay = self._delay_before_retry(attempt, result.response)
            logger.warning(
                "Sonos %s attempt %d of %d failed (%s, status %s); retrying in %.2f s",
                operation,
                attempt,
                max_attempts,
                result.outcome,
                result.status if result.status is not None else result.transport_error,
                delay,
                extra={
                    "sonos_operation": str(operation),
                    "attempt": attempt,
                    "failure_kind": str(result.outcome),
                    "http_status": result.status,
                },
            )
            self._sleep(delay)

    def _delay_before_retry(self, failed_attempts: int, response: requests.Response | None) -> float:
        config = self._config
        if response is not None:
            asked = retry_after_seconds(response.headers.get("Retry-After"))
            if asked is not None:
                return min(asked, config.retry_after_cap_seconds)
        return full_jitter_delay(
            failed_attempts,
            base_seconds=config.backoff_base_seconds,
            cap_seconds=config.backoff_cap_seconds,
            random=self._random,
        )

    def _raise_unless_ok(self, operation: Operation, result: _CallResult) -> requests.Response:
        if result.outcome is Outcome.OK and result.response is not None:
            return result.response
        status = result.status
        logger.warning(
            "Sonos %s failed: %s (%s) after %d attempt(s)",
            operation,
            result.outcome,
            result.describe(),
            result.attempts,
        )
        if result.outcome is Outcome.TRANSIENT:
            raise SonosUnavailable(
                f"Sonos {operation} failed after {result.attempts} attempt(s): {result.describe()}.",
                operation=operation,
                status=status,
            )
        if result.outcome is Outcome.GRANT_REJECTED:
            error_code = result.error_code or f"http_{status}"
            raise SonosGrantRejected(
                error_code,
                f"Sonos rejected the grant during {operation}: HTTP {status} {error_code}.",
                operation=operation,
                status=status,
            )
        raise SonosClientRejected(
            f"Sonos rejected this service's client during {operation}: {result.describe()}.",
            operation=operation,
            status=status,
            error_code=result.error_code,
        )


def _invalid(operation: Operation, status: int, problem: str) -> SonosInvalidResponse:
    logger.warning("Sonos %s answered HTTP %d but %s", operation, status, problem)
    return SonosInvalidResponse(
        f"Sonos {operation} answered HTTP {status} but {problem}.", operation=operation, status=status
    )


def _json_object(operation: Operation, response: requests.Response) -> Mapping[str, object]:
    try:
        body = response.json()
    except ValueError:
        raise _invalid(operation, response.status_code, "the body is not JSON") from None
    if not isinstance(body, Mapping):
        raise _invalid(operation, response.status_code, "the body is not a JSON object")
    return body


def _token_response(operation: Operation, response: requests.Response) -> TokenResponse:
    body = _json_object(operation, response)
    try:
        return TokenResponse.model_validate(body)
    except pydantic.ValidationError as exc:
        # Field names only: the validation error itself is built from token-bearing input.
        fields = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]}) or ["token response"]
        raise _invalid(operation, response.status_code, f"without a usable {', '.join(fields)}") from None


def _household_ids(response: requests.Response) -> list[str]:
    operation = Operation.LIST_HOUSEHOLDS
    status = response.status_code
    households = _json_object(operation, response).get("households")
    if not isinstance(households, list):
        raise _invalid(operation, status, "without a households list")
    ids: list[str] = []
    for household in households:
        household_id = household.get("id") if isinstance(household, Mapping) else None
        if not isinstance(household_id, str) or not household_id.strip():
            raise _invalid(operation, status, "with a household that has no id")
        if household_id not in ids:
            ids.append(household_id)
    return ids
