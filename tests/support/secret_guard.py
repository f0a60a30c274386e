"""Secret guard: every secret a test used must appear in nothing the service let out.

A pytest plugin. The ``secret_guard`` fixture collects the secrets in play and, when the
test ends, searches everything the service produced for them; one hit fails the test.

Secrets are collected from:

- the environment at the start and the end of the test: ``SONOS_CLIENT_SECRET``,
  ``SUPABASE_SERVICE_ROLE_KEY``, ``TOKEN_ENCRYPTION_KEYS`` (the ring and each key as
  base64 and hex);
- every HTTP exchange made with ``requests`` (the Sonos stand-in, or ``responses``
  stubs): tokens in token responses, the code and refresh token in token request
  forms, the client secret in Basic auth, bearer tokens;
- whatever the test adds with :meth:`SecretGuard.add` / :meth:`SecretGuard.add_key_ring`.

Searched for them:

- every log record created during the test, whatever logger, level or handler
  (message, arguments, ``extra`` fields and the formatted exception chain);
- the test's captured stdout, stderr and log sections (setup and call phases);
- every answer of a handler (``token_manager.edge.serve`` / ``answer_direct``), headers
  and ``Location`` included. The one field allowed to carry a secret is a successful
  fetch's ``accessToken``: that is the service's job;
- every URL requested with ``requests`` and every ``Location`` header it got back (the
  ``code`` of a callback URL excepted: OAuth puts it there, and a test may play the browser);
- whatever the test hands to :meth:`SecretGuard.seen` (responses, URLs, exceptions with
  their causes).

Activation: the fault and fuzz suites' conftests import :func:`secret_guard_everywhere`
(autouse) and :func:`pytest_runtest_makereport`; ``pytest_plugins =
["tests.support.secret_guard"]`` in tests/conftest.py does it for the whole suite.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests

from tests.support.secrets_scan import find_leaks

__all__ = [
    "SecretGuard",
    "pytest_runtest_makereport",
    "secret_guard",
    "secret_guard_everywhere",
    "without_fetched_token",
]

# Settings whose values are secrets wherever they come from.
SECRET_ENVIRONMENT_VARIABLES = ("SONOS_CLIENT_SECRET", "SUPABASE_SERVICE_ROLE_KEY")
KEY_RING_ENVIRONMENT_VARIABLE = "TOKEN_ENCRYPTION_KEYS"
# Form fields and JSON fields of OAuth traffic that carry a secret.
SECRET_FORM_FIELDS = ("code", "refresh_token", "client_secret", "token", "access_token")
SECRET_JSON_FIELDS = ("access_token", "refresh_token", "id_token")
OAUTH_CALLBACK_PATH = "/sonos/oauth/callback"

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


class SecretGuard:
    """The secrets of one test and everything the service let out during it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._outputs: list[tuple[str, str]] = []  # (where, text)
        self._records: list[logging.LogRecord] = []

    # -- secrets -------------------------------------------------------------------

    def add(self, *values: str | None) -> None:
        """Register secret values (empty and ``None`` are ignored)."""
        with self._lock:
            self._secrets.update(value for value in values if value)

    def add_key_ring(self, ring_json: str | None) -> None:
        """Register a key ring: its JSON and every key as base64 and hex."""
        if not ring_json:
            return
        self.add(ring_json)
        try:
            ring = json.loads(ring_json)
            keys = ring.get("keys", {}) if isinstance(ring, dict) else {}
        except ValueError:
            return  # a deliberately broken ring: its text alone is the secret
        for encoded in keys.values() if isinstance(keys, dict) else ():
            if not isinstance(encoded, str):
                continue
            self.add(encoded)
            try:
                material = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            self.add(material.hex(), base64.urlsafe_b64encode(material).decode())

    def add_from_environment(self) -> None:
        for name in SECRET_ENVIRONMENT_VARIABLES:
            self.add(os.environ.get(name, "").strip())
        self.add_key_ring(os.environ.get(KEY_RING_ENVIRONMENT_VARIABLE, "").strip())

    @property
    def secrets(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._secrets)

    # -- outputs -------------------------------------------------------------------

    def seen(self, value: object, where: str = "seen by the test") -> None:
        """Something the service let out: an answer, a URL, a page, an exception (with its causes)."""
        self._output(where, _as_text(value))

    def _output(self, where: str, text: str) -> None:
        with self._lock:
            self._outputs.append((where, text))

    def _record(self, record: logging.LogRecord) -> None:
        with self._lock:
            self._records.append(record)

    # -- the verdict ---------------------------------------------------------------

    def leaks(self, extra_outputs: Iterable[tuple[str, str]] = ()) -> list[str]:
        """``"<secret prefix>... in <where>"`` for every secret found anywhere."""
        with self._lock:
            outputs = [*self._outputs, *(("log record", _record_text(r)) for r in self._records)]
        outputs.extend(extra_outputs)
        found: list[str] = []
        for where, text in outputs:
            found.extend(f"{leak} in {where}" for leak in find_leaks(self.secrets, [text]))
        return sorted(set(found))

    # -- hooks into the service ----------------------------------------------------

    def answer_recorder(self, original: Callable[..., Any], where: str) -> Callable[..., Any]:
        """``original`` (a handler-answering function), recording every answer it gives."""

        def recording(*args: Any, **kwargs: Any) -> Any:
            answer = original(*args, **kwargs)
            self._output(where, _as_text(without_fetched_token(answer)))
            return answer

        return recording

    def session_send_recorder(self, original: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
        """``requests.Session.send`` harvesting secrets from OAuth traffic and recording URLs and redirects."""

        def recording(session: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            self._harvest_request(request)
            self._output("a requested URL", _without_callback_code(str(request.url)))
            response = original(session, request, **kwargs)
            self._harvest_response(response)
            location = response.headers.get("Location")
            if location:
                self._output("a redirect Location", _without_callback_code(location))
            return response

        return recording

    def _harvest_request(self, request: requests.PreparedRequest) -> None:
        authorization = request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            self.add(credentials.strip())
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, ValueError):
                decoded = ""
            self.add(decoded.partition(":")[2])
        body = request.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", errors="replace")
        if isinstance(body, str) and "=" in body:
            form = parse_qs(body, keep_blank_values=False)
            for name in SECRET_FORM_FIELDS:
                self.add(*form.get(name, []))

    def _harvest_response(self, response: requests.Response) -> None:
        if "json" not in response.headers.get("Content-Type", ""):
            return
        try:
            body = response.json()
        except ValueError:
            return
        if isinstance(body, Mapping):
            for name in SECRET_JSON_FIELDS:
                value = body.get(name)
                if isinstance(value, str):
                    self.add(value)


def _without_callback_code(url: str) -> str:
    """The URL minus the one secret OAuth puts in a URL by design: the code Sonos sends the
    browser back to our callback with (a test acting as that browser requests it)."""
    parts = urlsplit(url)
    if not parts.path.endswith(OAUTH_CALLBACK_PATH):
        return url
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name != "code"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def without_fetched_token(answer: Any) -> Any:
    """The answer minus a successful fetch's ``accessToken`` (direct or in an API body)."""
    if not isinstance(answer, dict):
        return answer
    if "accessToken" in answer and "error" not in answer:
        return {name: value for name, value in answer.items() if name != "accessToken"}
    body = answer.get("body")
    if isinstance(body, str) and answer.get("statusCode") == 200:
        try:
            parsed = json.loads(body)
        except ValueError:
            return answer
        if isinstance(parsed, dict) and "accessToken" in parsed:
            parsed.pop("accessToken")
            return {**answer, "body": json.dumps(parsed)}
    return answer


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, BaseException):
        # The whole chain: a cause's message (a driver error quoting a DSN, say) counts too.
        return "".join(traceback.format_exception(value)) + repr(value)
    try:
        return json.dumps(value, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def _record_text(record: logging.LogRecord) -> str:
    parts: list[str] = []
    try:
        parts.append(record.getMessage())
    except Exception as exc:
        parts.append(f"<unformattable: {type(exc).__name__}>")
    parts.append(json.dumps(record.__dict__, default=repr))
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(record.exc_info[1])))
    return "\n".join(parts)


def _captured_sections(item: pytest.Item) -> Iterator[tuple[str, str]]:
    """What pytest captured for the test so far: stdout, stderr and log of setup and call."""
    for when, report in item.stash.get(_REPORTS, {}).items():
        for name, text in report.sections:
            yield f"{name.lower()} ({when})", text


# --------------------------------------------------------------------------- the plugin


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Keep each phase's report: the guard reads what was captured in it at teardown."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    item.stash.setdefault(_REPORTS, {})[report.when] = report


@pytest.fixture
def secret_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretGuard]:
    """A :class:`SecretGuard` watching this test; it fails the test on a leak."""
    from token_manager import edge

    guard = SecretGuard()
    guard.add_from_environment()

    previous_factory = logging.getLogRecordFactory()

    def recording_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous_factory(*args, **kwargs)
        guard._record(record)
        return record

    logging.setLogRecordFactory(recording_factory)
    monkeypatch.setattr(requests.Session, "send", guard.session_send_recorder(requests.Session.send))
    monkeypatch.setattr(edge, "serve", guard.answer_recorder(edge.serve, "a handler answer"))
    monkeypatch.setattr(edge, "answer_direct", guard.answer_recorder(edge.answer_direct, "a handler answer"))
    try:
        yield guard
    finally:
        logging.setLogRecordFactory(previous_factory)
    guard.add_from_environment()
    leaks = guard.leaks(_captured_sections(request.node))
    if leaks:
        pytest.fail("secrets leaked: " + "; ".join(leaks), pytrace=False)


@pytest.fixture(autouse=True)
def secret_guard_everywhere(secret_guard: SecretGuard) -> SecretGuard:
    """Autouse form of :func:`secret_guard` for the suites that import it."""
    return secret_guard
