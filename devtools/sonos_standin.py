"""A local stand-in for the Sonos cloud (consent page, token endpoint, households) with fault knobs."""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import html
import http.client
import json
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from html.parser import HTMLParser
from typing import Any, Final, Literal, Self, cast
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from devtools.http_serving import KeepAliveHandler, QuietThreadingServer, Running, serve_in_thread, shut_down

AUTHORIZE_PATH: Final = "/login/v3/oauth"
DECISION_PATH: Final = "/login/v3/oauth/decision"
TOKEN_PATH: Final = "/login/v3/oauth/access"
REVOKE_PATH: Final = "/login/v3/oauth/revoke"
CONTROL_API_PATH: Final = "/control/api/v1"
HOUSEHOLDS_PATH: Final = CONTROL_API_PATH + "/households"
ADMIN_STATS_PATH: Final = "/__admin/stats"
ADMIN_CONFIG_PATH: Final = "/__admin/config"
ADMIN_RESET_PATH: Final = "/__admin/reset"

COUNT_KINDS: Final = (
    "authorize",
    "decision",
    "token_code",
    "token_refresh",
    "token_other",  # a token request with a missing or unsupported grant_type
    "households",
    "revoke",
)
DEFAULT_EXPIRES_IN_SECONDS: Final = 86399
DEFAULT_PORT: Final = 8710
CLIENT_SECRET_ENV: Final = "SONOS_STANDIN_CLIENT_SECRET"  # the CLI's secret, kept off argv
MAX_BODY_BYTES: Final = 64 * 1024
CONSENT_REQUEST_TIMEOUT_SEC: Final = 10.0
SHUTDOWN_POLL_INTERVAL_SEC: Final = 0.01  # how soon stop() is noticed by the serving thread

# What the refresh response carries instead of a new refresh token when rotation is off.
NonRotatingRefreshToken = Literal["omit", "empty", "null", "same"]

_ACTION_KNOBS: Final = ("revoke_refresh_token", "revoke_all_refresh_tokens")


@dataclass(frozen=True)
class StandInConfig:
    """Every knob of the stand-in; `configure()` and `POST /__admin/config` take the same names.

    Pending faults are consumed one per request, in this order: reset, hang, rate limit, fail.
    """

    client_id: str = "standin-client"
    client_secret: str = field(default="standin-secret", repr=False)
    app_name: str = "Storytailor"
    scope: str = "playback-control-all"  # granted when the authorize request names none
    redirect_uris: tuple[str, ...] = ()  # exact-match allow-list; empty accepts any http(s) URI
    expires_in: int | str | None = DEFAULT_EXPIRES_IN_SECONDS  # str: sent as a JSON string; None: field omitted
    rotate_refresh_tokens: bool = True
    non_rotating_refresh_token: NonRotatingRefreshToken = "omit"
    households: int = 1
    code_ttl_seconds: float = 60.0
    enable_revoke: bool = True  # the real Sonos documents no revocation endpoint
    revoke_requires_client_auth: bool = True  # RFC 7009: a confidential client authenticates
    log_requests: bool = False  # method, path (never the query) and status to stderr
    # Faults, for the token endpoint (and the households endpoint when faults_apply_to_households).
    latency_seconds: float = 0.0
    fail_next: int = 0
    fail_status: int = 503
    rate_limit_next: int = 0
    retry_after_seconds: int | None = 1  # None: 429 without a Retry-After header
    reset_next: int = 0
    hang_next: int = 0
    hang_seconds: float = 30.0
    invalid_client: bool = False  # 401 invalid_client for every token request, even with the right secret
    faults_apply_to_households: bool = False


class ConsentPageError(RuntimeError):
    """The consent page or the decision endpoint did not answer as a browser would expect."""


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _Drop(Enum):
    """A request answered by closing the connection instead of a reply."""

    RESET = "reset"  # RST at once
    HANG = "hang"  # hold the connection open, then close it without a word


@dataclass
class _Grant:
    account: str
    scope: str
    refresh_token: str
    revoked: bool = False


@dataclass
class _AuthorizationCode:
    redirect_uri: str
    account: str
    scope: str
    issued_at: float
    used: bool = False


@dataclass(frozen=True)
class _AccessToken:
    grant: _Grant
    expires_at: float


def _json_reply(status: int, payload: Mapping[str, object], *headers: tuple[str, str]) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), "application/json;charset=UTF-8", headers)


def _token_error(status: int, error: str, description: str | None = None) -> _Reply:
    payload = {"error": error} if description is None else {"error": error, "error_description": description}
    headers: tuple[tuple[str, str], ...] = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
    if status == 401:
        headers += (("WWW-Authenticate", 'Basic realm="Sonos"'),)
    return _json_reply(status, payload, *headers)


def _fault_401(faultstring: str, errorcode: str) -> _Reply:
    # The Apigee-style shape the control API has used; clients should key on the status, not this body.
    body = {"fault": {"faultstring": faultstring, "detail": {"errorcode": errorcode}}}
    return _json_reply(401, body, ("WWW-Authenticate", "Bearer"))


def _form(body: bytes) -> dict[str, str]:
    """The first value of each field of a form-urlencoded body (blank values kept)."""
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}


def _with_query(uri: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(uri)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _lifetime_seconds(expires_in: int | str | None) -> int:
    """How long an access token really lives: the advertised expires_in when it parses, else the default."""
    try:
        return int(expires_in) if expires_in is not None else DEFAULT_EXPIRES_IN_SECONDS
    except ValueError:
        return DEFAULT_EXPIRES_IN_SECONDS


def _household_id(account: str, index: int) -> str:
    # Derived, not random, so an account sees the same ids across refreshes and household-count changes.
    digest = base64.b32encode(hashlib.sha256(f"{account}/{index}".encode()).digest()).decode()
    return f"Sonos_{digest[:26]}.{digest[26:48]}"


def _client_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, client_secret = decoded.partition(":")
    return (client_id, client_secret) if colon else None


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _matches_annotation(value: object, annotation: object) -> bool:
    """A small runtime check of a JSON value against a StandInConfig field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches_annotation(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches_annotation(item, args[0]) for item in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return False


_KNOB_TYPES: Final[dict[str, object]] = typing.get_type_hints(StandInConfig, include_extras=False)
_NON_NEGATIVE_KNOBS: Final = (
    "households",
    "code_ttl_seconds",
    "latency_seconds",
    "fail_next",
    "rate_limit_next",
    "retry_after_seconds",
    "reset_next",
    "hang_next",
    "hang_seconds",
)


def _validated_knobs(knobs: Mapping[str, object]) -> dict[str, object]:
    """The config fields in `knobs`, type-checked; raises ValueError naming the first bad knob."""
    changes: dict[str, object] = {}
    for name, raw in knobs.items():
        if name in _ACTION_KNOBS:
            continue
        if name not in _KNOB_TYPES:
            raise ValueError(f"unknown knob: {name}")
        value = tuple(raw) if isinstance(raw, list) else raw
        if not _matches_annotation(value, _KNOB_TYPES[name]):
            raise ValueError(f"knob {name} has the wrong type: expected {_KNOB_TYPES[name]}")
        if name in _NON_NEGATIVE_KNOBS and isinstance(value, int | float) and value < 0:
            raise ValueError(f"knob {name} must not be negative")
        if name == "fail_status" and not (400 <= cast(int, value) <= 599):
            raise ValueError("knob fail_status must be an HTTP error status (400-599)")
        changes[name] = value
    if "revoke_refresh_token" in knobs and not isinstance(knobs["revoke_refresh_token"], str):
        raise ValueError("knob revoke_refresh_token must be a string")
    if "revoke_all_refresh_tokens" in knobs and not isinstance(knobs["revoke_all_refresh_tokens"], bool):
        raise ValueError("knob revoke_all_refresh_tokens must be true or false")
    return changes


_PAGE_STYLE: Final = """
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f2f2f2;color:#111}
main{background:#fff;border-radius:14px;box-shadow:0 2px 14px rgba(0,0,0,.08);padding:2rem;width:min(26rem,90vw)}
.brand{font-weight:700;letter-spacing:.35em;font-size:.85rem}
h1{font-size:1.3rem;line-height:1.35;margin:1rem 0 .5rem}
p{color:#444;line-height:1.45;margin:.5rem 0}
code{background:#f2f2f2;border-radius:4px;padding:.1rem .3rem}
.buttons{display:flex;gap:.75rem;margin-top:1.5rem}
button{flex:1;padding:.75rem 1rem;border-radius:999px;font-size:1rem;cursor:pointer;border:1px solid #111}
#allow{background:#111;color:#fff}
#deny{background:#fff;color:#111}
.note{font-size:.75rem;color:#888;margin-top:1.5rem}
"""


def _page(title: str, content: str) -> bytes:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head>\n"
        f'<body><main><div class="brand">SONOS</div>\n{content}\n'
        '<p class="note">Local Sonos stand-in for development: no real Sonos account is involved.</p>'
        "</main></body></html>\n"
    ).encode()


def _consent_page(app_name: str, scope: str, hidden_fields: Mapping[str, str]) -> bytes:
    app = html.escape(app_name)
    hidden = "\n".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in hidden_fields.items()
    )
    return _page(
        f"Allow {app_name} to control your Sonos system?",
        f"<h1>Allow {app} to control your Sonos system?</h1>\n"
        f"<p>{app} asks for: <code>{html.escape(scope)}</code></p>\n"
        f'<form method="post" action="{DECISION_PATH}">\n{hidden}\n'
        '<div class="buttons">'
        '<button type="submit" id="deny" name="decision" value="deny">Deny</button>'
        '<button type="submit" id="allow" name="decision" value="allow">Allow</button>'
        "</div></form>",
    )


def _error_page(status: int, reason: str) -> _Reply:
    content = f'<h1>This link cannot be used</h1>\n<p id="error">{html.escape(reason)}</p>'
    return _Reply(status, _page("Sonos: error", content), "text/html;charset=utf-8")


class SonosStandIn(Running):
    """The stand-in server: real HTTP on a loopback port, served from a background thread.

    Example::

        with SonosStandIn(StandInConfig(households=2)) as sonos:
            # point SONOS_AUTH_BASE_URL at sonos.url and SONOS_CONTROL_BASE_URL at sonos.control_url, then:
            callback_url = sonos.approve(authorization_url)  # what the service's initiate returned
            sonos.configure(fail_next=1, fail_status=503)  # the next token request answers 503
    """

    def __init__(
        self,
        config: StandInConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial_config = config or StandInConfig()
        self._config = self._initial_config
        self._host = host
        self._requested_port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _StandInServer | None = None
        self._thread: threading.Thread | None = None
        self._counts = dict.fromkeys(COUNT_KINDS, 0)
        self._codes: dict[str, _AuthorizationCode] = {}
        self._grants_by_refresh_token: dict[str, _Grant] = {}
        self._access_tokens: dict[str, _AccessToken] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the Sonos stand-in is already running")
        self._stopping.clear()
        server = _StandInServer((self._host, self._requested_port))
        server.stand_in = self
        self._server = server
        self._thread = serve_in_thread(server, name="sonos-standin", poll_interval=SHUTDOWN_POLL_INTERVAL_SEC)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes requests sleeping in latency or hang faults
        shut_down(server, thread)
        server.close_open_connections()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The auth base URL (SONOS_AUTH_BASE_URL)."""
        if self._server is None:
            raise RuntimeError("the Sonos stand-in is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def control_url(self) -> str:
        """The control API base URL (SONOS_CONTROL_BASE_URL)."""
        return self.url + CONTROL_API_PATH

    @property
    def revoke_url(self) -> str:
        return self.url + REVOKE_PATH

    # -- knobs and statistics ------------------------------------------------------------------

    @property
    def config(self) -> StandInConfig:
        with self._lock:
            return self._config

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def configure(self, **knobs: Any) -> None:
        """Change knobs (StandInConfig field names) at once, plus two actions for a grant the user revokes:
        `revoke_refresh_token="..."` and `revoke_all_refresh_tokens=True`."""
        changes = _validated_knobs(knobs)
        with self._lock:
            self._config = dataclasses.replace(self._config, **changes)  # type: ignore[arg-type]
            if "revoke_refresh_token" in knobs:
                grant = self._grants_by_refresh_token.get(knobs["revoke_refresh_token"])
                if grant is not None:
                    self._revoke_grant_locked(grant)
            if knobs.get("revoke_all_refresh_tokens"):
                for grant in list(self._grants_by_refresh_token.values()):
                    self._revoke_grant_locked(grant)

    def reset(self) -> None:
        """Back to how it started: zero counts, the initial knobs (so no pending faults), no codes or tokens."""
        with self._lock:
            self._config = self._initial_config
            self._counts = dict.fromkeys(COUNT_KINDS, 0)
            self._codes.clear()
            self._grants_by_refresh_token.clear()
            self._access_tokens.clear()

    def public_config(self) -> dict[str, object]:
        """The knobs as JSON-ready values, without the client secret."""
        snapshot = dataclasses.asdict(self.config)
        snapshot.pop("client_secret")
        snapshot["redirect_uris"] = list(snapshot["redirect_uris"])
        return snapshot

    # -- browser conveniences for scripts --------------------------------------------------------

    def approve(self, authorize_url: str, *, account: str | None = None) -> str:
        """Open the consent page, press Allow, and return the redirect Location (the callback URL) unfollowed.

        `account` names the Sonos account that consents; the same name gives the same household ids.
        """
        return _submit_consent(authorize_url, "allow", account)

    def deny(self, authorize_url: str) -> str:
        """Open the consent page, press Deny, and return the redirect Location unfollowed."""
        return _submit_consent(authorize_url, "deny", None)

    # -- the endpoints (called by the handler; each returns what to answer) ----------------------

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def _injected_fault(self, config: StandInConfig) -> _Drop | _Reply | None:
        """Apply the latency, then consume one pending fault, if any."""
        if config.latency_seconds > 0:
            self._stopping.wait(config.latency_seconds)
        with self._lock:
            current = self._config
            if current.reset_next > 0:
                self._config = dataclasses.replace(current, reset_next=current.reset_next - 1)
                return _Drop.RESET
            if current.hang_next > 0:
                self._config = dataclasses.replace(current, hang_next=current.hang_next - 1)
                return _Drop.HANG
            if current.rate_limit_next > 0:
                self._config = dataclasses.replace(current, rate_limit_next=current.rate_limit_next - 1)
                retry_after = current.retry_after_seconds
                headers = () if retry_after is None else (("Retry-After", str(retry_after)),)
                return _json_reply(429, {"error": "too_many_requests"}, *headers)
            if current.fail_next > 0:
                self._config = dataclasses.replace(current, fail_next=current.fail_next - 1)
                return _json_reply(current.fail_status, {"error": "server_error", "error_description": "injected"})
        return None

    def _authorize(self, query: Mapping[str, str]) -> _Reply:
        config = self.config
        problem = self._authorize_problem(config, query)
        if problem is not None:
            return _error_page(400, problem)
        hidden = {
            name: query[name]
            for name in ("client_id", "response_type", "state", "scope", "redirect_uri", "account")
            if name in query
        }
        body = _consent_page(config.app_name, query.get("scope") or config.scope, hidden)
        return _Reply(200, body, "text/html;charset=utf-8", (("Cache-Control", "no-store"),))

    @staticmethod
    def _authorize_problem(config: StandInConfig, query: Mapping[str, str]) -> str | None:
        if query.get("client_id") != config.client_id:
            return "Unknown client_id."
        if query.get("response_type") != "code":
            return "response_type must be code."
        redirect_uri = query.get("redirect_uri", "")
        parts = urlsplit(redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            return "redirect_uri must be an absolute http(s) URI without a fragment."
        if config.redirect_uris and redirect_uri not in config.redirect_uris:
            return "redirect_uri is not registered for this client."
        return None

    def _decide(self, form: Mapping[str, str]) -> _Reply:
        config = self.config
        problem = self._authorize_problem(config, form)
        if problem is not None:
            return _error_page(400, problem)
        decision = form.get("decision")
        redirect_uri = form["redirect_uri"]
        state = {"state": form["state"]} if "state" in form else {}
        if decision == "deny":
            location = _with_query(redirect_uri, {"error": "access_denied", **state})
        elif decision == "allow":
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = _AuthorizationCode(
                    redirect_uri=redirect_uri,
                    account=form.get("account") or secrets.token_hex(8),
                    scope=form.get("scope") or config.scope,
                    issued_at=self._clock(),
                )
            location = _with_query(redirect_uri, {"code": code, **state})
        else:
            return _error_page(400, "decision must be allow or deny.")
        return _Reply(302, b"", "text/plain", (("Location", location), ("Cache-Control", "no-store")))

    def _token(self, config: StandInConfig, authorization: str | None, form: Mapping[str, str]) -> _Reply:
        if config.invalid_client or not self._client_authenticated(config, authorization):
            return _token_error(401, "invalid_client")
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(config, form)
        if grant_type == "refresh_token":
            return self._refresh(config, form)
        if not grant_type:
            return _token_error(400, "invalid_request", "grant_type is required")
        return _token_error(400, "unsupported_grant_type")

    @staticmethod
    def _client_authenticated(config: StandInConfig, authorization: str | None) -> bool:
        credentials = _client_credentials(authorization)
        if credentials is None:
            return False
        client_id, client_secret = credentials
        return secrets.compare_digest(client_id.encode(), config.client_id.encode()) and secrets.compare_digest(
            client_secret.encode(), config.client_secret.encode()
        )

    def _exchange_code(self, config: StandInConfig, form: Mapping[str, str]) -> _Reply:
        code_value = form.get("code", "")
        with self._lock:
            code = self._codes.get(code_value)
            if code is None or code.used:
                return _token_error(400, "invalid_grant", "unknown or already used authorization code")
            # A code is spent by any exchange that names it, as RFC 6749 asks, even one that fails below.
            code.used = True
            if self._clock() - code.issued_at > config.code_ttl_seconds:
                return _token_error(400, "invalid_grant", "authorization code expired")
            if form.get("redirect_uri") != code.redirect_uri:
                return _token_error(400, "invalid_grant", "redirect_uri does not match the authorize request")
            grant = _Grant(account=code.account, scope=code.scope, refresh_token=secrets.token_urlsafe(32))
            self._grants_by_refresh_token[grant.refresh_token] = grant
            access_token = self._issue_access_token_locked(config, grant)
        return self._token_reply(config, access_token, grant.scope, {"refresh_token": grant.refresh_token})

    def _refresh(self, config: StandInConfig, form: Mapping[str, str]) -> _Reply:
        old_refresh_token = form.get("refresh_token", "")
        with self._lock:
            grant = self._grants_by_refresh_token.get(old_refresh_token)
            if grant is None or grant.revoked:
                # Sonos documents invalid_request (not invalid_grant) for a bad refresh token.
                return _token_error(400, "invalid_request", "Invalid refresh token")
            refresh_field: dict[str, str | None]
            if config.rotate_refresh_tokens:
                del self._grants_by_refresh_token[old_refresh_token]
                grant.refresh_token = secrets.token_urlsafe(32)
                self._grants_by_refresh_token[grant.refresh_token] = grant
                refresh_field = {"refresh_token": grant.refresh_token}
            elif config.non_rotating_refresh_token == "empty":
                refresh_field = {"refresh_token": ""}
            elif config.non_rotating_refresh_token == "null":
                refresh_field = {"refresh_token": None}
            elif config.non_rotating_refresh_token == "same":
                refresh_field = {"refresh_token": grant.refresh_token}
            else:
                refresh_field = {}
            access_token = self._issue_access_token_locked(config, grant)
        return self._token_reply(config, access_token, grant.scope, refresh_field)

    def _issue_access_token_locked(self, config: StandInConfig, grant: _Grant) -> str:
        access_token = secrets.token_urlsafe(32)
        expires_at = self._clock() + _lifetime_seconds(config.expires_in)
        self._access_tokens[access_token] = _AccessToken(grant=grant, expires_at=expires_at)
        return access_token

    @staticmethod
    def _token_reply(
        config: StandInConfig, access_token: str, scope: str, refresh_field: Mapping[str, str | None]
    ) -> _Reply:
        payload: dict[str, object] = {"access_token": access_token, "token_type": "Bearer", **refresh_field}
        if config.expires_in is not None:
            payload["expires_in"] = config.expires_in
        payload["scope"] = scope
        return _json_reply(200, payload, ("Cache-Control", "no-store"), ("Pragma", "no-cache"))

    def _households(self, config: StandInConfig, authorization: str | None) -> _Reply:
        token = _bearer_token(authorization)
        with self._lock:
            issued = self._access_tokens.get(token) if token else None
            if issued is None or issued.grant.revoked:
                return _fault_401("Invalid Access Token", "keymanagement.service.invalid_access_token")
            if self._clock() >= issued.expires_at:
                return _fault_401("Access Token expired", "keymanagement.service.access_token_expired")
            account = issued.grant.account
        households = [{"id": _household_id(account, index)} for index in range(config.households)]
        return _json_reply(200, {"households": households})

    def _revoke(self, config: StandInConfig, authorization: str | None, form: Mapping[str, str]) -> _Reply:
        if config.revoke_requires_client_auth and not self._client_authenticated(config, authorization):
            return _token_error(401, "invalid_client")
        token = form.get("token")
        if not token:
            return _token_error(400, "invalid_request", "token is required")
        with self._lock:
            grant = self._grants_by_refresh_token.get(token)
            if grant is None and token in self._access_tokens:
                grant = self._access_tokens[token].grant
            if grant is not None:
                self._revoke_grant_locked(grant)
        # RFC 7009: an unknown token is answered like a revoked one.
        return _Reply(200, b"", "text/plain")

    def _revoke_grant_locked(self, grant: _Grant) -> None:
        """Revoking either token ends the whole grant: its refresh token and every access token."""
        grant.revoked = True
        self._grants_by_refresh_token.pop(grant.refresh_token, None)

    def _admin_config(self, body: bytes) -> _Reply:
        try:
            knobs = json.loads(body or b"{}")
            if not isinstance(knobs, dict):
                raise ValueError("the body must be a JSON object of knobs")
            self.configure(**knobs)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            return _json_reply(400, {"error": "invalid_knobs", "error_description": str(exc)})
        return _json_reply(200, {"config": self.public_config()})


class _StandInServer(QuietThreadingServer):
    label = "sonos stand-in"
    stand_in: SonosStandIn

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _StandInHandler)
        self._open_connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._open_connections.add(connection)
            else:
                self._open_connections.discard(connection)

    def close_open_connections(self) -> None:
        """End keep-alive connections too, so a stopped stand-in answers nobody."""
        with self._connections_lock:
            connections = list(self._open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)


class _StandInHandler(KeepAliveHandler):
    server_version = "SonosStandIn/1"

    _body_read = False

    @property
    def _server(self) -> _StandInServer:
        return cast(_StandInServer, self.server)

    @property
    def _stand_in(self) -> SonosStandIn:
        return self._server.stand_in

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection, open_=True)

    def finish(self) -> None:
        self._server.track(self.connection, open_=False)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self._body_read = False  # one handler serves every request of a keep-alive connection
        path = urlsplit(self.path).path
        routes: dict[str, tuple[str, Callable[[], _Reply | _Drop]]] = {
            AUTHORIZE_PATH: ("GET", self._serve_authorize),
            DECISION_PATH: ("POST", self._serve_decision),
            TOKEN_PATH: ("POST", self._serve_token),
            REVOKE_PATH: ("POST", self._serve_revoke),
            HOUSEHOLDS_PATH: ("GET", self._serve_households),
            ADMIN_STATS_PATH: ("GET", lambda: _json_reply(200, self._stand_in.counts())),
            ADMIN_RESET_PATH: ("POST", self._serve_admin_reset),
        }
        reply: _Reply | _Drop
        if path == ADMIN_CONFIG_PATH and method == "GET":
            reply = _json_reply(200, {"config": self._stand_in.public_config()})
        elif path == ADMIN_CONFIG_PATH and method == "POST":
            reply = self._stand_in._admin_config(self._read_body())
        elif path not in routes or (path == REVOKE_PATH and not self._stand_in.config.enable_revoke):
            self._read_body()
            reply = _json_reply(404, {"error": "not_found"})
        elif routes[path][0] != method:
            self._read_body()
            reply = _json_reply(405, {"error": "method_not_allowed"}, ("Allow", routes[path][0]))
        else:
            try:
                reply = routes[path][1]()
            except Exception as exc:  # noqa: BLE001 - a dev server answers 500 rather than dropping the client
                print(f"sonos stand-in: internal error ({type(exc).__name__})", file=sys.stderr)
                reply = _json_reply(500, {"error": "server_error"})
        self._send(reply)

    def _serve_authorize(self) -> _Reply:
        self._stand_in._count("authorize")
        return self._stand_in._authorize(_form(urlsplit(self.path).query.encode()))

    def _serve_decision(self) -> _Reply:
        self._stand_in._count("decision")
        return self._stand_in._decide(_form(self._read_body()))

    def _serve_token(self) -> _Reply | _Drop:
        form = _form(self._read_body())  # read before any fault, so the kind can be counted
        grant_type = form.get("grant_type")
        kind = {"authorization_code": "token_code", "refresh_token": "token_refresh"}.get(
            grant_type or "", "token_other"
        )
        self._stand_in._count(kind)
        config = self._stand_in.config
        fault = self._stand_in._injected_fault(config)
        if fault is not None:
            return fault
        return self._stand_in._token(config, self.headers.get("Authorization"), form)

    def _serve_households(self) -> _Reply | _Drop:
        self._stand_in._count("households")
        config = self._stand_in.config
        if config.faults_apply_to_households:
            fault = self._stand_in._injected_fault(config)
            if fault is not None:
                return fault
        return self._stand_in._households(config, self.headers.get("Authorization"))

    def _serve_revoke(self) -> _Reply:
        form = _form(self._read_body())
        self._stand_in._count("revoke")
        return self._stand_in._revoke(self._stand_in.config, self.headers.get("Authorization"), form)

    def _serve_admin_reset(self) -> _Reply:
        self._read_body()
        self._stand_in.reset()
        return _json_reply(200, {"reset": True})

    def _read_body(self) -> bytes:
        if self._body_read:
            return b""
        self._body_read = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            return b""
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread rest would be parsed as the next request
            return b""
        return self.rfile.read(length)

    def _send(self, reply: _Reply | _Drop) -> None:
        if reply is _Drop.RESET:
            self._reset_connection()
            return
        if reply is _Drop.HANG:
            self._stand_in._stopping.wait(self._stand_in.config.hang_seconds)
            self.close_connection = True
            return
        assert isinstance(reply, _Reply)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up first (its timeout, a hang fault)

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST: the client sees a reset, not an empty answer.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Only the path: an authorize query carries the state, and a callback URL would carry a code.
        if self._stand_in.config.log_requests:
            path = urlsplit(self.path).path
            print(f"sonos stand-in: {self.command} {path} {code}", file=sys.stderr)


class _ConsentFormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.hidden: dict[str, str] = {}
        self.button_ids: set[str] = set()
        self.error: str | None = None
        self._in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.action = attributes.get("action")
        elif tag == "input" and attributes.get("type") == "hidden" and "name" in attributes:
            self.hidden[attributes["name"]] = attributes.get("value", "")
        elif tag == "button" and "id" in attributes:
            self.button_ids.add(attributes["id"])
        self._in_error = attributes.get("id") == "error"

    def handle_data(self, data: str) -> None:
        if self._in_error:
            self.error = (self.error or "") + data

    def handle_endtag(self, tag: str) -> None:
        self._in_error = False


def _submit_consent(authorize_url: str, decision: Literal["allow", "deny"], account: str | None) -> str:
    parts = urlsplit(authorize_url)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise ConsentPageError("the authorize URL must be an absolute http(s) URL")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=CONSENT_REQUEST_TIMEOUT_SEC)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path or "/")
        response = connection.getresponse()
        page = response.read().decode("utf-8", errors="replace")
        form = _ConsentFormParser()
        form.feed(page)
        if response.status != 200:
            raise ConsentPageError(f"the consent page answered {response.status}: {form.error or 'no reason given'}")
        if form.action is None or decision not in form.button_ids:
            raise ConsentPageError(f"the consent page has no form with a {decision} button")
        fields = {**form.hidden, "decision": decision}
        if account is not None:
            fields["account"] = account
        connection.request(
            "POST",
            form.action,
            body=urlencode(fields),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = connection.getresponse()
        response.read()
        location = response.getheader("Location")
        if response.status != 302 or not location:
            raise ConsentPageError(f"the decision answered {response.status} without a redirect")
        return location
    finally:
        connection.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.sonos_standin",
        description="Run a local stand-in for the Sonos cloud in the foreground (Ctrl-C stops it).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--client-id", default=StandInConfig.client_id)
    parser.add_argument(
        "--client-secret",
        default=os.environ.get(CLIENT_SECRET_ENV) or StandInConfig.client_secret,
        help=f"default: ${CLIENT_SECRET_ENV}, else standin-secret (never printed; the variable keeps it off argv)",
    )
    parser.add_argument("--app-name", default=StandInConfig.app_name)
    parser.add_argument("--redirect-uri", action="append", default=[], help="registered redirect URI (repeatable)")
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=int, default=DEFAULT_EXPIRES_IN_SECONDS)
    expiry.add_argument("--expires-in-string", metavar="TEXT", help="send expires_in as this JSON string")
    expiry.add_argument("--omit-expires-in", action="store_true")
    parser.add_argument("--households", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--code-ttl", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens on refresh")
    parser.add_argument(
        "--non-rotating-refresh-token",
        choices=typing.get_args(NonRotatingRefreshToken),
        default="omit",
        help="what a refresh response carries with --no-rotate",
    )
    parser.add_argument("--no-revoke", action="store_true", help="no revocation endpoint, like the real Sonos")
    parser.add_argument("--log-requests", action="store_true", help="log method, path and status (never a query)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    expires_in: int | str | None = args.expires_in
    if args.omit_expires_in:
        expires_in = None
    elif args.expires_in_string is not None:
        expires_in = args.expires_in_string
    config = StandInConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        app_name=args.app_name,
        redirect_uris=tuple(args.redirect_uri),
        expires_in=expires_in,
        rotate_refresh_tokens=not args.no_rotate,
        non_rotating_refresh_token=args.non_rotating_refresh_token,
        households=args.households,
        latency_seconds=args.latency,
        code_ttl_seconds=args.code_ttl,
        enable_revoke=not args.no_revoke,
        log_requests=args.log_requests,
    )
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
    with SonosStandIn(config, host=args.host, port=args.port) as stand_in:
        print(f"Sonos stand-in listening on {stand_in.url}")
        print(f"SONOS_AUTH_BASE_URL={stand_in.url}")
        print(f"SONOS_CONTROL_BASE_URL={stand_in.control_url}")
        if config.enable_revoke:
            print(f"SONOS_REVOKE_URL={stand_in.revoke_url}")
        print(f"SONOS_CLIENT_ID={config.client_id}")
        admin_paths = (ADMIN_STATS_PATH, ADMIN_CONFIG_PATH, ADMIN_RESET_PATH)
        print("admin: " + "  ".join(stand_in.url + path for path in admin_paths), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop_requested.wait()


if __name__ == "__main__":
    main()
