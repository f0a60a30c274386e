"""make demo: the Sonos OAuth and token lifecycle, end to end, through the real handlers on the local API."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import json
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO
from urllib.parse import parse_qs, urlsplit

from devtools.local_api import REPO_ROOT
from devtools.local_stack import LocalStack
from devtools.sonos_standin import StandInConfig

USER_ID: Final = "demo-user-7c9e6679"
DENYING_USER_ID: Final = "demo-user-who-says-no"
SONOS_ACCOUNT: Final = "demo-sonos-account"
HOUSEHOLDS: Final = 2
CONCURRENT_FETCHES: Final = 8
REFRESH_LATENCY_SECONDS: Final = 0.3  # Sonos "takes a while", so the concurrent fetches overlap the refresh
REFRESH_AHEAD_SECONDS: Final = 300
TOKEN_LIFETIME_SECONDS: Final = 86_399  # what Sonos (and the stand-in) grant
EVENTS_DIR: Final = REPO_ROOT / "events"
HTTP_TIMEOUT_SEC: Final = 30.0


class StepFailed(Exception):
    """A step did not do what it should; the message says what was expected and what happened."""


# ---------------------------------------------------------------------------- output


class _CapturedOutput(io.TextIOBase):
    """Stands in for sys.stdout while the handlers run: their JSON logs and EMF metrics land here,
    not in the transcript, and the demo reads them back (metric names, the secrets scan)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._pending = ""
        self._lines: list[str] = []
        self._cursor = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *complete, self._pending = self._pending.split("\n")
            self._lines.extend(line for line in complete if line.strip())
        return len(text)

    def take_new(self) -> list[str]:
        """The lines written since the last call."""
        with self._lock:
            new, self._cursor = self._lines[self._cursor :], len(self._lines)
            return new

    def everything(self) -> list[str]:
        with self._lock:
            return [*self._lines, self._pending]


def fingerprint(secret: str) -> str:
    """A short, one-way name for a secret value: enough to tell two tokens apart, useless to an attacker."""
    return "#" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def describe_token(secret: str) -> str:
    return f"{fingerprint(secret)} ({len(secret)} chars)"


def _metrics_summary(lines: list[str]) -> str:
    """The EMF lines Powertools Metrics printed, summed: counts as totals, latencies as averages."""
    totals: dict[str, float] = {}
    samples: dict[str, int] = {}
    units: dict[str, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "_aws" not in record:
            continue
        for directive in record["_aws"].get("CloudWatchMetrics", []):
            for metric in directive.get("Metrics", []):
                name = metric.get("Name")
                value = record.get(name)
                values = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int | float)]
                totals[name] = totals.get(name, 0) + sum(values)
                samples[name] = samples.get(name, 0) + len(values)
                units[name] = metric.get("Unit", "Count")
    shown = []
    for name in sorted(totals):
        if name == "ColdStart":
            continue
        if units[name] == "Milliseconds" and samples[name]:
            shown.append(f"{name} avg {totals[name] / samples[name]:.1f} ms")
        else:
            shown.append(f"{name}={totals[name]:g}")
    return ", ".join(shown)


def _page_title(page: str) -> str:
    found = re.search(r"<title>(.*?)</title>", page, re.DOTALL)
    return html.unescape(found.group(1)).strip() if found else ""


def _log_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if '"_aws"' not in line]


@dataclass
class Step:
    number: int
    title: str
    request: str = ""
    status: str = "-"
    latency_ms: float | None = None
    details: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.details.append(line)

    def expect(self, condition: bool, failure: str) -> None:
        if not condition:
            raise StepFailed(failure)


class Transcript:
    """Numbered steps with request, status, latency and what was stored; stops at the first failure."""

    def __init__(self, out: TextIO, captured: _CapturedOutput, *, verbose: bool) -> None:
        self._out = out
        self._captured = captured
        self._verbose = verbose
        self._count = 0
        self.failed: str | None = None
        self.api_log: list[str] = []
        self.lines: list[str] = []  # what the transcript printed, for the secrets scan

    def line(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, file=self._out, flush=True)

    def api_log_line(self, text: str) -> None:
        self.api_log.append(text)

    def handler_output(self) -> list[str]:
        """Every line the handlers wrote (JSON logs, EMF metrics) since the demo began."""
        return self._captured.everything()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Step]:
        self._count += 1
        step = Step(self._count, title)
        self._captured.take_new()
        try:
            yield step
        except StepFailed as exc:
            self._print(step, ok=False)
            self.line(f"      FAILED: {exc}")
            self.failed = f"step {step.number} ({title}): {exc}"
            raise
        except Exception as exc:
            self._print(step, ok=False)
            self.line(f"      FAILED with {type(exc).__name__}: {str(exc)[:300]}")
            self.failed = f"step {step.number} ({title}): {type(exc).__name__}"
            raise StepFailed(str(exc)) from exc
        self._print(step, ok=True)

    def _print(self, step: Step, *, ok: bool) -> None:
        latency = f"{step.latency_ms:8.1f} ms" if step.latency_ms is not None else " " * 11
        verdict = "ok" if ok else "FAIL"
        self.line(f"{step.number:>2}. {step.title:<40} {step.request:<42} {step.status:>5} {latency}  {verdict}")
        for detail in step.details:
            self.line(f"      {detail}")
        output = self._captured.take_new()
        metrics = _metrics_summary(output)
        if metrics:
            self.line(f"      metrics: {metrics}")
        if self._verbose:
            for log in _log_lines(output):
                self.line(f"      log: {log[:400]}")


# ---------------------------------------------------------------------------- the story


@dataclass
class Observed:
    """Every secret value the demo saw, for the final scan (they must appear nowhere they should not)."""

    secrets: set[str] = field(default_factory=set)
    pages: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, stack: LocalStack, transcript: Transcript) -> None:
        import redis
        import requests

        from token_manager.cache import token_key

        self.stack = stack
        self.t = transcript
        self.http = requests.Session()
        self.redis = redis.Redis.from_url(stack.settings["REDIS_URL"], decode_responses=True)
        self.token_key = token_key(USER_ID)
        self.observed = Observed()
        self.observed.secrets.add(stack.settings["SONOS_CLIENT_SECRET"])
        self._remember_key_material(stack.current_key_ring_json())

    # -- helpers -----------------------------------------------------------------------------

    def call(self, step: Step, method: str, path: str, **kwargs: Any) -> Any:
        """One HTTP request to the local API, timed; the step shows its status and latency."""
        step.request = f"{method} {path}"
        started = time.perf_counter()
        response = self.http.request(
            method, self.stack.api.url + path, timeout=HTTP_TIMEOUT_SEC, allow_redirects=False, **kwargs
        )
        step.latency_ms = (time.perf_counter() - started) * 1000
        step.status = str(response.status_code)
        return response

    def invoke(self, step: Step, function: str, payload: dict[str, Any], label: str) -> Any:
        """A direct invoke (the router's path, or a schedule), timed."""
        step.request = label
        started = time.perf_counter()
        answer = self.stack.api.runner.invoke(function, payload)
        step.latency_ms = (time.perf_counter() - started) * 1000
        error = answer.get("error") if isinstance(answer, dict) else None
        step.status = str(error.get("status", "err")) if isinstance(error, dict) else "ok"
        return answer

    def row(self) -> dict[str, Any] | None:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.stack.settings["DATABASE_URL"], row_factory=dict_row) as connection:
            return connection.execute("select * from sonos_tokens where user_id = %s", (USER_ID,)).fetchone()

    def decrypt(self, row: dict[str, Any], column: str, field_name: str) -> str:
        """A stored token in clear, for fingerprints and the secrets scan only (never printed)."""
        from token_manager.crypto import KeyRing, TokenCipher

        cipher = TokenCipher(KeyRing.from_json(self.stack.current_key_ring_json()))
        value = cipher.decrypt(row[column], key_id=row["encryption_key_id"], user_id=USER_ID, field=field_name)
        self.observed.secrets.add(value)
        return value

    def describe_row(self, step: Step, row: dict[str, Any]) -> None:
        access = self.decrypt(row, "access_token_encrypted", "access_token")
        refresh = self.decrypt(row, "refresh_token_encrypted", "refresh_token")
        expires_in = (row["expires_at"] - datetime.now(UTC)).total_seconds()
        step.note(
            f"Postgres sonos_tokens: token_status={row['token_status']} version={row['version']} "
            f"key id={row['encryption_key_id']} expires in {expires_in:,.0f} s"
        )
        step.note(
            f"  access_token_encrypted {len(row['access_token_encrypted'])} chars -> access token "
            f"{describe_token(access)}; refresh_token_encrypted {len(row['refresh_token_encrypted'])} chars -> "
            f"refresh token {describe_token(refresh)}"
        )

    def cache_present(self) -> bool:
        return bool(self.redis.exists(self.token_key))

    def age_token(self, *, expires_in_seconds: int) -> None:
        """Make the stored token look like a day-old token with `expires_in_seconds` left.

        Why this way rather than a stand-in with a short expires_in (say 400 s with the
        300 s refresh window): the manager refreshes a token whose whole lifetime is
        shorter than twice the window at half its lifetime instead (field case C11, no
        refresh loop), so a 400 s token would only come due after 200 s of waiting. Moving
        expires_at (and last_refreshed_at, so the lifetime stays a normal day) is exactly
        the state the row reaches after a day, and takes no time. The Redis copy is
        dropped too: its TTL never outlives the refresh point, so by then it would be gone.
        """
        import psycopg

        issued_seconds_ago = TOKEN_LIFETIME_SECONDS - expires_in_seconds
        with psycopg.connect(self.stack.settings["DATABASE_URL"]) as connection:
            connection.execute(
                "update sonos_tokens set expires_at = now() + make_interval(secs => %s),"
                " last_refreshed_at = now() - make_interval(secs => %s) where user_id = %s",
                (expires_in_seconds, issued_seconds_ago, USER_ID),
            )
        self.redis.delete(self.token_key)

    def _remember_key_material(self, ring_json: str) -> None:
        for key in json.loads(ring_json).get("keys", {}).values():
            self.observed.secrets.add(str(key))

    def fetch_json(self, step: Step, *, expect_status: int = 200) -> dict[str, Any]:
        response = self.call(step, "GET", "/sonos/token", params={"userId": USER_ID})
        step.expect(
            response.status_code == expect_status,
            f"fetch answered {response.status_code} {response.text[:200]}, expected {expect_status}",
        )
        payload: dict[str, Any] = response.json()
        if "accessToken" in payload:
            self.observed.secrets.add(payload["accessToken"])
        return payload

    # -- the story ---------------------------------------------------------------------------

    def run(self) -> None:
        counts_at_start = self.stack.stand_in.counts()
        state, authorization_url = self.initiate()
        callback_url = self.consent(authorization_url, state)
        self.callback(callback_url, state)
        self.repeated_callback(callback_url)
        self.denied_link()
        first_token = self.fetch_from_store_by_router()
        self.fetch_cache_hit(first_token)
        self.fetch_store_read_after_cache_drop(first_token)
        refreshed_token = self.fetch_refreshes_once_for_concurrent_callers(first_token)
        self.refresher_run(refreshed_token)
        self.key_rotation()
        self.revoke()
        self.fetch_after_revoke()
        self.no_secret_leaked(counts_at_start)

    def initiate(self) -> tuple[str, str]:
        from token_manager.cache import state_key

        with self.t.step("initiate (platform backend)") as step:
            response = self.call(step, "POST", "/sonos/oauth/initiate", json={"userId": USER_ID})
            step.expect(response.status_code == 200, f"initiate answered {response.status_code}: {response.text}")
            payload = response.json()
            url, state = payload["authorizationUrl"], payload["state"]
            parts = urlsplit(url)
            query = parse_qs(parts.query)
            step.expect(
                url.startswith(self.stack.stand_in.url + "/login/v3/oauth"), "the URL is not Sonos's authorize page"
            )
            step.expect(query.get("redirect_uri") == [self.stack.redirect_uri], "the redirect_uri is not registered")
            step.expect(query.get("state") == [state], "the authorize URL does not carry the state")
            ttl = self.redis.ttl(state_key(state))
            step.expect(0 < ttl <= 600, f"the state is not in Redis with a 10-minute TTL (ttl {ttl})")
            step.note(f"authorizationUrl -> {parts.scheme}://{parts.netloc}{parts.path} (client_id, scope, state)")
            step.note(
                f"state: {len(state)} chars, Redis sonos:oauth:state:<state> TTL {ttl} s; "
                f"expiresIn {payload['expiresIn']}"
            )
            return state, url

    def consent(self, authorization_url: str, state: str) -> str:
        with self.t.step("the user presses Allow at Sonos") as step:
            step.request = "stand-in consent page"
            started = time.perf_counter()
            callback_url = self.stack.stand_in.approve(authorization_url, account=SONOS_ACCOUNT)
            step.latency_ms = (time.perf_counter() - started) * 1000
            step.status = "302"
            parts = urlsplit(callback_url)
            query = parse_qs(parts.query)
            step.expect(
                callback_url.startswith(self.stack.redirect_uri + "?"), "Sonos did not redirect to the callback"
            )
            step.expect(query.get("state") == [state], "the redirect does not carry our state")
            step.note(
                f"redirect to {parts.scheme}://{parts.netloc}{parts.path}"
                f"?code=<{len(query['code'][0])} chars>&state=<ours>"
            )
            return callback_url

    def callback(self, callback_url: str, state: str) -> None:
        from token_manager.cache import state_key

        with self.t.step("callback (the browser's redirect)") as step:
            before = self.stack.stand_in.counts()
            parts = urlsplit(callback_url)
            response = self.call(step, "GET", f"{parts.path}?{parts.query}")
            step.request = "GET /sonos/oauth/callback?code&state"
            self.observed.pages.append(response.text)
            step.expect(response.status_code == 200, f"callback answered {response.status_code}: {response.text[:300]}")
            after = self.stack.stand_in.counts()
            step.expect(after["token_code"] - before["token_code"] == 1, "not exactly one code exchange at Sonos")
            step.expect(not self.redis.exists(state_key(state)), "the state was not consumed")
            row = self.row()
            step.expect(row is not None and row["token_status"] == "active", "no active grant stored")
            assert row is not None
            step.expect(len(row["household_ids"]) == HOUSEHOLDS, f"expected {HOUSEHOLDS} households")
            title = _page_title(response.text)
            step.expect(title == "Sonos is connected", f"the page says {title!r}, not that Sonos is connected")
            step.note(f'page "{title}" ({len(response.text)} bytes, no token in it); state consumed (GETDEL)')
            step.note(f"Sonos: 1 code exchange, 1 households call; households {row['household_ids']}")
            self.describe_row(step, row)  # decrypts the stored tokens into observed.secrets
            step.expect(not any(secret in response.text for secret in self.observed.secrets), "a token is in the page")

    def repeated_callback(self, callback_url: str) -> None:
        with self.t.step("same callback again (C7 double click)") as step:
            before = self.stack.stand_in.counts()
            version_before = self._version()
            parts = urlsplit(callback_url)
            response = self.call(step, "GET", f"{parts.path}?{parts.query}")
            step.request = "GET /sonos/oauth/callback?code&state"
            self.observed.pages.append(response.text)
            step.expect(response.status_code == 200, f"the repeat answered {response.status_code}, not like the first")
            step.expect(self.stack.stand_in.counts()["token_code"] == before["token_code"], "a second code exchange")
            step.expect(self._version() == version_before, "the stored grant changed")
            step.note("answered like the first; no second code exchange; the stored grant is unchanged")

    def denied_link(self) -> None:
        with self.t.step("another user presses Deny") as step:
            response = self.http.post(
                self.stack.api.url + "/sonos/oauth/initiate", json={"userId": DENYING_USER_ID}, timeout=HTTP_TIMEOUT_SEC
            )
            step.expect(response.status_code == 200, f"initiate answered {response.status_code}")
            denied_url = self.stack.stand_in.deny(response.json()["authorizationUrl"])
            parts = urlsplit(denied_url)
            answer = self.call(step, "GET", f"{parts.path}?{parts.query}")
            step.request = "GET /sonos/oauth/callback?error"
            self.observed.pages.append(answer.text)
            step.expect(answer.status_code == 400, f"a denied link answered {answer.status_code}, expected 400")
            title = _page_title(answer.text)
            step.expect(title == "Sonos was not connected", f"the denied page says {title!r}")
            step.expect(self._row_exists(DENYING_USER_ID) is False, "a grant was stored for a denied link")
            step.note(f'error=access_denied -> 400 page "{title}"; nothing stored for that user')

    def fetch_from_store_by_router(self) -> str:
        with self.t.step("fetch by the router (direct invoke)") as step:
            cached_before = self.cache_present()
            payload = {"userId": USER_ID, "correlationId": "demo-router-1"}
            answer = self.invoke(step, "TokenFetchFunction", payload, "invoke TokenFetchFunction {userId}")
            step.expect("accessToken" in answer, f"the router got {answer}")
            token: str = answer["accessToken"]
            self.observed.secrets.add(token)
            step.expect(not cached_before and self.cache_present(), "expected a store read that fills the cache")
            step.note(
                f"store read (Redis sonos:token:{{userId}} absent before, present after): access token "
                f"{describe_token(token)}, household {answer['householdId']}, expiresAt {answer['expiresAt']}"
            )
            return token

    def fetch_cache_hit(self, expected_token: str) -> None:
        with self.t.step("fetch over the API: cache hit") as step:
            cached_before = self.cache_present()
            payload = self.fetch_json(step)
            step.expect(cached_before, "the token was not in Redis before the fetch")
            step.expect(payload["accessToken"] == expected_token, "a different token than the stored one")
            ttl = self.redis.ttl(self.token_key)
            step.note(f"cache hit (key present before); same token {fingerprint(expected_token)}; cache TTL {ttl} s")

    def fetch_store_read_after_cache_drop(self, expected_token: str) -> None:
        with self.t.step("drop the cache entry, fetch: store read") as step:
            self.redis.delete(self.token_key)
            payload = self.fetch_json(step)
            step.expect(payload["accessToken"] == expected_token, "a different token than the stored one")
            step.expect(self.cache_present(), "the store read did not fill the cache again")
            step.note(f"store read (key absent before, present after); same token {fingerprint(expected_token)}")

    def fetch_refreshes_once_for_concurrent_callers(self, old_token: str) -> str:
        with self.t.step(f"token ages; {CONCURRENT_FETCHES} fetches at once") as step:
            self.age_token(expires_in_seconds=60)
            before_row = self.row()
            assert before_row is not None
            old_refresh = self.decrypt(before_row, "refresh_token_encrypted", "refresh_token")
            step.note(
                f"aged in Postgres: expires in 60 s (refresh point is {REFRESH_AHEAD_SECONDS} s ahead), "
                "cache entry dropped"
            )
            self.stack.stand_in.configure(latency_seconds=REFRESH_LATENCY_SECONDS)
            before = self.stack.stand_in.counts()
            step.request = f"{CONCURRENT_FETCHES} x GET /sonos/token"
            started = time.perf_counter()
            try:
                with ThreadPoolExecutor(CONCURRENT_FETCHES) as pool:
                    responses = list(
                        pool.map(
                            lambda _: self.http.get(
                                self.stack.api.url + "/sonos/token",
                                params={"userId": USER_ID},
                                timeout=HTTP_TIMEOUT_SEC,
                            ),
                            range(CONCURRENT_FETCHES),
                        )
                    )
            finally:
                self.stack.stand_in.configure(latency_seconds=0.0)
            step.latency_ms = (time.perf_counter() - started) * 1000
            statuses = sorted({response.status_code for response in responses})
            step.status = ",".join(str(status) for status in statuses)
            step.expect(statuses == [200], f"fetches answered {statuses}")
            tokens = {response.json()["accessToken"] for response in responses}
            self.observed.secrets.update(tokens)
            refreshes = self.stack.stand_in.counts()["token_refresh"] - before["token_refresh"]
            step.expect(refreshes == 1, f"{refreshes} refresh requests reached Sonos, expected exactly 1")
            step.expect(len(tokens) == 1, f"the callers got {len(tokens)} different tokens")
            new_token = str(tokens.pop())
            step.expect(new_token != old_token, "the token was not refreshed")
            after_row = self.row()
            assert after_row is not None
            new_refresh = self.decrypt(after_row, "refresh_token_encrypted", "refresh_token")
            step.note(
                f"Sonos saw exactly 1 refresh request (single flight, {REFRESH_LATENCY_SECONDS:g} s latency); "
                f"all {CONCURRENT_FETCHES} callers got {fingerprint(new_token)} (was {fingerprint(old_token)})"
            )
            step.note(
                f"refresh token rotated {fingerprint(old_refresh)} -> {fingerprint(new_refresh)}; "
                f"version {before_row['version']} -> {after_row['version']}"
            )
            self.describe_row(step, after_row)
            return new_token

    def refresher_run(self, current_token: str) -> None:
        with self.t.step("scheduled refresher run") as step:
            self.age_token(expires_in_seconds=120)
            before = self.stack.stand_in.counts()
            version_before = self._version()
            event = json.loads((EVENTS_DIR / "token_refresher_schedule.json").read_text())
            answer = self.invoke(step, "TokenRefresherFunction", event, "invoke TokenRefresherFunction (schedule)")
            step.status = "ok" if "refreshed" in answer else step.status
            step.expect(answer.get("refreshed") == 1, f"the refresher answered {answer}")
            refreshes = self.stack.stand_in.counts()["token_refresh"] - before["token_refresh"]
            step.expect(refreshes == 1, f"{refreshes} refresh requests reached Sonos, expected 1")
            row = self.row()
            assert row is not None
            step.expect(row["version"] != version_before, "the stored grant did not change")
            new_token = self.decrypt(row, "access_token_encrypted", "access_token")
            self.decrypt(row, "refresh_token_encrypted", "refresh_token")  # for the final secrets scan
            step.expect(new_token != current_token, "the stored token did not change")
            step.note(f"token aged to 120 s left; answer {json.dumps(answer)}")
            step.note(f"stored access token {fingerprint(current_token)} -> {fingerprint(new_token)}")

    def key_rotation(self) -> None:
        with self.t.step("key rotation") as step:
            before = self.row()
            assert before is not None
            old_ring = self.stack.current_key_ring_json()
            token_before = self.decrypt(before, "access_token_encrypted", "access_token")
            event = json.loads((EVENTS_DIR / "key_rotation_schedule.json").read_text())
            answer = self.invoke(step, "KeyRotationFunction", event, "invoke KeyRotationFunction (schedule)")
            step.expect("activeKeyId" in answer, f"the rotation answered {answer}")
            step.status = "ok"
            new_ring = self.stack.current_key_ring_json()
            self._remember_key_material(new_ring)
            after = self.row()
            assert after is not None
            step.expect(new_ring != old_ring, f"the ring in SSM {self.stack.key_ring_parameter} did not change")
            step.expect(after["encryption_key_id"] == answer["activeKeyId"], "the row is not under the new key")
            step.expect(after["encryption_key_id"] != before["encryption_key_id"], "the row's key id did not change")
            step.expect(
                self.decrypt(after, "access_token_encrypted", "access_token") == token_before,
                "re-encryption changed the token",
            )
            ring_ids = sorted(json.loads(new_ring)["keys"])
            step.note(
                f"SSM {self.stack.key_ring_parameter} (local moto SSM): keys {ring_ids}, active {answer['activeKeyId']}"
            )
            step.note(
                f"row key id {before['encryption_key_id']} -> {after['encryption_key_id']}; ciphertext "
                f"{len(before['access_token_encrypted'])}/{len(before['refresh_token_encrypted'])} -> "
                f"{len(after['access_token_encrypted'])}/{len(after['refresh_token_encrypted'])} chars "
                f"(access/refresh); version {before['version']} -> {after['version']}; "
                f"same token {fingerprint(token_before)}"
            )
            step.note(f"answer {json.dumps({k: v for k, v in answer.items() if k not in ('activeKeyId',)})}")
        with self.t.step("fetch after rotation") as step:
            self.redis.delete(self.token_key)
            payload = self.fetch_json(step)
            step.expect(payload["accessToken"] == token_before, "the token read back differs after rotation")
            step.note(f"the row under the new key decrypts: same token {fingerprint(token_before)}")

    def revoke(self) -> None:
        with self.t.step("revoke by the router (direct invoke)") as step:
            before = self.stack.stand_in.counts()
            answer = self.invoke(
                step, "TokenRevokeFunction", {"userId": USER_ID}, "invoke TokenRevokeFunction {userId}"
            )
            step.expect(answer == {"revoked": True, "providerRevoked": True}, f"revoke answered {answer}")
            step.expect(self.stack.stand_in.counts()["revoke"] - before["revoke"] == 1, "Sonos saw no revocation")
            step.expect(self.row() is None, "the row is still there")
            step.expect(not self.cache_present(), "the cache entry is still there")
            step.note(f"answer {json.dumps(answer)}; row deleted, Redis entry gone, Sonos revocation called once")
            again = self.stack.api.runner.invoke("TokenRevokeFunction", {"userId": USER_ID})
            step.expect(again == {"revoked": False, "providerRevoked": False}, f"a second revoke answered {again}")
            step.note(f"again (idempotent): {json.dumps(again)}")

    def fetch_after_revoke(self) -> None:
        with self.t.step("fetch after revoke") as step:
            payload = self.fetch_json(step, expect_status=404)
            step.expect(payload.get("error", {}).get("code") == "not_connected", f"fetch answered {payload}")
            direct = self.stack.api.runner.invoke("TokenFetchFunction", {"userId": USER_ID})
            step.expect(direct.get("error", {}).get("status") == 404, f"the router got {direct}")
            step.note(f"API: 404 {json.dumps(payload)}")
            step.note(f"router: {json.dumps(direct)}")

    def no_secret_leaked(self, counts_at_start: dict[str, int]) -> None:
        with self.t.step("no secret in logs, pages or transcript") as step:
            captured = self.t.handler_output()
            haystacks = [*captured, *self.t.api_log, *self.observed.pages, *self.t.lines]
            leaks = [fingerprint(s) for s in self.observed.secrets if len(s) >= 8 and any(s in h for h in haystacks)]
            step.expect(not leaks, f"secrets found: {leaks}")
            counts = self.stack.stand_in.counts()
            used = {name: counts[name] - counts_at_start.get(name, 0) for name in counts}
            step.note(
                f"{len(self.observed.secrets)} secret values (tokens, client secret, keys) checked against "
                f"{len(captured)} handler log/metric lines, {len(self.t.api_log)} API log lines, "
                f"{len(self.observed.pages)} pages and this transcript"
            )
            step.note(
                "Sonos stand-in requests: " + ", ".join(f"{name} {value}" for name, value in used.items() if value)
            )

    # -- small reads -------------------------------------------------------------------------

    def _version(self) -> int | None:
        row = self.row()
        return None if row is None else int(row["version"])

    def _row_exists(self, user_id: str) -> bool:
        import psycopg

        with psycopg.connect(self.stack.settings["DATABASE_URL"]) as connection:
            return (
                connection.execute("select 1 from sonos_tokens where user_id = %s", (user_id,)).fetchone() is not None
            )


# ---------------------------------------------------------------------------- entry point


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description="Run the Sonos token service's story end to end (needs REDIS_URL and DATABASE_URL: make demo).",
    )
    parser.add_argument("--verbose", action="store_true", help="also print the handlers' JSON log lines")
    return parser.parse_args(argv)


def _required_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"{name} is not set: run the demo with `make demo` (scripts/with-services.sh sets it)")
    return value


def run(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the story; 0 when every step did what it should, 1 otherwise."""
    args = _parse_args(argv)
    # Powertools warns when an invocation has no metric besides the cold start (initiate, say).
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    out = out or sys.stdout
    redis_url, database_url = _required_env("REDIS_URL"), _required_env("DATABASE_URL")
    captured = _CapturedOutput()
    transcript = Transcript(out, captured, verbose=args.verbose)
    started = time.perf_counter()
    # Handlers log JSON and print EMF metrics to stdout; keep them for the scan, out of the transcript.
    with contextlib.redirect_stdout(captured):
        stack = LocalStack(
            redis_url=redis_url,
            database_url=database_url,
            standin_config=StandInConfig(households=HOUSEHOLDS),
            refresh_ahead_seconds=REFRESH_AHEAD_SECONDS,
            local_ssm=True,
            api_log=transcript.api_log_line,
        )
        try:
            stack.start()
        except Exception as exc:  # noqa: BLE001 - any start-up failure ends the demo with one clear line
            print(f"demo: could not start the local stack ({type(exc).__name__}: {exc})", file=out)
            return 1
        try:
            _print_header(transcript, stack)
            demo = Demo(stack, transcript)
            with contextlib.suppress(StepFailed):
                demo.run()
        finally:
            stack.stop()
    elapsed = time.perf_counter() - started
    transcript.line()
    if transcript.failed:
        transcript.line(f"DEMO FAILED at {transcript.failed} ({elapsed:.1f} s)")
        return 1
    transcript.line(f"Every step did what it should ({elapsed:.1f} s).")
    return 0


def _print_header(transcript: Transcript, stack: LocalStack) -> None:
    redis_at = urlsplit(stack.settings["REDIS_URL"]).netloc
    postgres = urlsplit(stack.settings["DATABASE_URL"])
    ring = json.loads(stack.current_key_ring_json())
    transcript.line("Sonos token service: the whole story, through the real handlers (no AWS, no Docker, no internet)")
    transcript.line(f"  local API       {stack.api.url}  routes from template.yaml, handlers in-process")
    transcript.line(f"  Sonos stand-in  {stack.stand_in.url}  consent page, token endpoint, {HOUSEHOLDS} households")
    transcript.line(f"  Redis           {redis_at}    Postgres {postgres.hostname}:{postgres.port}{postgres.path}")
    transcript.line(f"  key ring        SSM {stack.key_ring_parameter} (local moto SSM), active key {ring['active']}")
    transcript.line(f"  user            {USER_ID}; tokens are shown as #fingerprint (length), never in clear")
    transcript.line()


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(run(argv))


if __name__ == "__main__":
    main()
