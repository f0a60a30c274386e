"""What every bench section stands on: the live Redis/Postgres, a Sonos stand-in process, seeded grants, counters."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from devtools.sonos_standin import CLIENT_SECRET_ENV

ROOT = Path(__file__).resolve().parent.parent
LAYER_DIR = ROOT / "layers" / "token_manager"

CLIENT_ID = "bench-client"
REDIRECT_URI = "http://127.0.0.1:9/sonos/oauth/callback"
# The stand-in's tokens are secrets.token_urlsafe(32): seeded tokens have the same length.
TOKEN_CHARS = 43
STANDIN_START_TIMEOUT_SEC = 15.0
ADMIN_TIMEOUT_SEC = 10.0


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the table)."""
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def required_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"{name} is not set: run the bench through scripts/with-services.sh (make bench does)")
    return value


# --------------------------------------------------------------------------- the Sonos stand-in


class StandInProcess:
    """``python -m devtools.sonos_standin`` in its own process, driven through its admin API.

    A process of its own, so its request threads never compete for the GIL with the
    code being measured (the refresher's pool, the handler in this process).
    """

    def __init__(self, *, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> StandInProcess:
        command = [
            sys.executable,
            "-m",
            "devtools.sonos_standin",
            "--port",
            "0",
            "--client-id",
            self.client_id,
        ]
        # The secret goes by environment, not argv, where `ps` would show it.
        env = {**child_env(), CLIENT_SECRET_ENV: self._client_secret}
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
        assert self._process.stdout is not None
        deadline = time.monotonic() + STANDIN_START_TIMEOUT_SEC
        while time.monotonic() < deadline:
            line = self._process.stdout.readline()
            if not line:
                break
            found = re.match(r"Sonos stand-in listening on (\S+)", line)
            if found:
                self.url = found.group(1)
            if line.startswith("admin:"):
                return self
        self.stop()
        raise RuntimeError("the Sonos stand-in did not start")

    @property
    def control_url(self) -> str:
        return self.url + "/control/api/v1"

    @property
    def revoke_url(self) -> str:
        return self.url + "/login/v3/oauth/revoke"

    def configure(self, **knobs: Any) -> None:
        self._admin("POST", "/__admin/config", knobs)

    def counts(self) -> dict[str, int]:
        answer: dict[str, int] = self._admin("GET", "/__admin/stats", None)
        return answer

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> StandInProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _admin(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=ADMIN_TIMEOUT_SEC)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {} if body is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            if response.status != 200:
                raise RuntimeError(f"stand-in admin {path} answered {response.status}: {text}")
            return json.loads(text)
        finally:
            connection.close()

    def mint_refresh_tokens(self, count: int, *, threads: int = 8) -> list[str]:
        """``count`` grants through the stand-in's own OAuth flow (consent, then code exchange), over HTTP.

        The bench seeds rows straight into Postgres, and a refresh only succeeds with a
        refresh token the stand-in issued: this is the real flow minus our service,
        two keep-alive requests per grant.
        """
        basic = base64.b64encode(f"{self.client_id}:{self._client_secret}".encode()).decode()
        parts = urlsplit(self.url)
        local = threading.local()

        def connection() -> http.client.HTTPConnection:
            if not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
            conn: http.client.HTTPConnection = local.connection
            return conn

        def mint(index: int) -> str:
            conn = connection()
            decision = {
                "client_id": self.client_id,
                "response_type": "code",
                "redirect_uri": REDIRECT_URI,
                "state": f"bench{index}",
                "account": f"bench-account-{index}",
                "decision": "allow",
            }
            form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request("POST", "/login/v3/oauth/decision", body=urlencode(decision), headers=form_headers)
            response = conn.getresponse()
            response.read()
            code = parse_qs(urlsplit(response.getheader("Location") or "").query)["code"][0]
            exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
            conn.request(
                "POST",
                "/login/v3/oauth/access",
                body=urlencode(exchange),
                headers={**form_headers, "Authorization": f"Basic {basic}"},
            )
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"the stand-in refused a code exchange ({response.status})")
            refresh_token: str = answer["refresh_token"]
            return refresh_token

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(mint, range(count)))


def child_env() -> dict[str, str]:
    """The environment for a child Python: the repo and the layer importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(LAYER_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# --------------------------------------------------------------------------- the service's settings


@dataclass
class BenchServices:
    """The live services and the settings the handlers are wired with."""

    redis_url: str
    database_url: str
    stand_in: StandInProcess
    client_secret: str
    key_ring_json: str
    saved_env: dict[str, str | None] = field(default_factory=dict)

    def handler_settings(self) -> dict[str, str]:
        """What a deployed function's environment (plus SSM) would give it, pointed at the live services."""
        return {
            "ENV": "dev",
            "LOG_LEVEL": "INFO",
            "POWERTOOLS_SERVICE_NAME": "sonos-token-service",
            "POWERTOOLS_METRICS_NAMESPACE": "SonosTokenService",
            "POWERTOOLS_LOGGER_LOG_EVENT": "false",
            "SONOS_CLIENT_ID": self.stand_in.client_id,
            "SONOS_CLIENT_SECRET": self.client_secret,
            "SONOS_REDIRECT_URI": REDIRECT_URI,
            "TOKEN_ENCRYPTION_KEYS": self.key_ring_json,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "SUPABASE_URL": "",
            "SUPABASE_SERVICE_ROLE_KEY": "",
            "SONOS_AUTH_BASE_URL": self.stand_in.url,
            "SONOS_CONTROL_BASE_URL": self.stand_in.control_url,
            "SONOS_REVOKE_URL": self.stand_in.revoke_url,
            "REFRESH_AHEAD_SECONDS": "300",
            "REFRESHER_CONCURRENCY": "16",
            "REFRESHER_PERIOD_SECONDS": "300",
            "EVENT_BUS_NAME": "",
        }

    @contextlib.contextmanager
    def handler_environment(self, overrides: Mapping[str, str] | None = None) -> Iterator[None]:
        """The handler settings in ``os.environ`` (where runtime reads them) for the block."""
        settings = {**self.handler_settings(), **(overrides or {})}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def start_services() -> BenchServices:
    from token_manager.crypto import KeyRing

    client_secret = secrets.token_urlsafe(24)
    stand_in = StandInProcess(client_id=CLIENT_ID, client_secret=client_secret).start()
    return BenchServices(
        redis_url=required_env("REDIS_URL"),
        database_url=required_env("DATABASE_URL"),
        stand_in=stand_in,
        client_secret=client_secret,
        key_ring_json=KeyRing.generate().to_json(),
    )


# --------------------------------------------------------------------------- seeded grants


@dataclass(frozen=True)
class SeededGrant:
    user_id: str
    access_token: str
    refresh_token: str
    expires_at: datetime
    last_refreshed_at: datetime


def household_id_for(user_id: str) -> str:
    # The stand-in's household id shape (Sonos_<26>.<22>); the value itself is never checked.
    digest = hashlib.sha256(user_id.encode()).hexdigest().upper()
    return f"Sonos_{digest[:26]}.{digest[26:48]}"


def seed_grants(database_url: str, key_ring_json: str, grants: Sequence[SeededGrant]) -> None:
    """Write grants straight into ``sonos_tokens``, encrypted with the service's key ring (replacing any)."""
    import psycopg

    from token_manager.crypto import KeyRing, TokenCipher

    cipher = TokenCipher(KeyRing.from_json(key_ring_json))
    rows = []
    for grant in grants:
        household = household_id_for(grant.user_id)
        rows.append(
            (
                grant.user_id,
                household,
                [household],
                cipher.encrypt(grant.access_token, user_id=grant.user_id, field="access_token"),
                cipher.encrypt(grant.refresh_token, user_id=grant.user_id, field="refresh_token"),
                cipher.active_key_id,
                grant.expires_at,
                "playback-control-all",
                grant.last_refreshed_at,
            )
        )
    with psycopg.connect(database_url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("delete from sonos_tokens where user_id = any(%s)", ([g.user_id for g in grants],))
        cursor.executemany(
            "insert into sonos_tokens (user_id, household_id, household_ids, access_token_encrypted,"
            " refresh_token_encrypted, encryption_key_id, expires_at, scope, token_status, last_refreshed_at)"
            " values (%s, %s, %s, %s, %s, %s, %s, %s, 'active', %s)",
            rows,
        )


def fresh_grant(user_id: str, *, refresh_token: str | None = None, lifetime: timedelta | None = None) -> SeededGrant:
    """A grant refreshed just now, valid for a day (or ``lifetime``)."""
    now = datetime.now(UTC)
    return SeededGrant(
        user_id=user_id,
        access_token=secrets.token_urlsafe(32),
        refresh_token=refresh_token or secrets.token_urlsafe(32),
        expires_at=now + (lifetime or timedelta(seconds=86399)),
        last_refreshed_at=now,
    )


# --------------------------------------------------------------------------- counting what reaches Redis and Postgres


def redis_command_calls(client: Any) -> dict[str, int]:
    """Calls per command from ``INFO commandstats`` (the INFO command itself left out)."""
    stats: dict[str, Any] = client.info("commandstats")
    calls: dict[str, int] = {}
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command != "info":
            calls[command] = int(values["calls"])
    return calls


def command_deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


@dataclass
class RoundTrips:
    """Commands a redis-py client sent, one round trip each (no pipelines on these paths)."""

    count: int = 0
    commands: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def counting_redis_round_trips(*, ignoring: object) -> Iterator[RoundTrips]:
    """Count the commands every redis-py client in this process sends during the block, except ``ignoring``
    (the bench's own client); ``INFO commandstats`` also counts the commands a script runs inside Redis."""
    import redis

    seen = RoundTrips()
    original: Callable[..., Any] = redis.Redis.execute_command

    def execute_command(client: Any, *args: Any, **options: Any) -> Any:
        if client is not ignoring:
            seen.count += 1
            name = str(args[0]).upper()
            seen.commands[name] = seen.commands.get(name, 0) + 1
        return original(client, *args, **options)

    redis.Redis.execute_command = execute_command  # type: ignore[method-assign,assignment]
    try:
        yield seen
    finally:
        redis.Redis.execute_command = original  # type: ignore[method-assign]


@dataclass
class SqlStatements:
    """Statements sent through psycopg while counting: how many, and the first one (for a baseline)."""

    count: int = 0
    first: tuple[Any, Any] | None = None


@contextlib.contextmanager
def counting_sql_statements() -> Iterator[SqlStatements]:
    """Count every statement any psycopg cursor in this process executes during the block.

    Counted at ``psycopg.Cursor.execute`` / ``executemany`` (``Connection.execute`` goes
    through a cursor), so the figure is what the store really sends, whatever its methods.
    """
    import psycopg

    seen = SqlStatements()
    original_execute = psycopg.Cursor.execute
    original_executemany = psycopg.Cursor.executemany

    def execute(cursor: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        seen.count += 1
        if seen.first is None:
            seen.first = (query, params)
        return original_execute(cursor, query, params, **kwargs)

    def executemany(cursor: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        seen.count += 1
        return original_executemany(cursor, query, params_seq, **kwargs)

    psycopg.Cursor.execute = execute  # type: ignore[method-assign,assignment]
    psycopg.Cursor.executemany = executemany  # type: ignore[method-assign,assignment]
    try:
        yield seen
    finally:
        psycopg.Cursor.execute = original_execute  # type: ignore[method-assign]
        psycopg.Cursor.executemany = original_executemany  # type: ignore[method-assign]


@contextlib.contextmanager
def stdout_discarded() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the block.

    The handlers print an EMF metrics line per invocation (and Powertools' JSON log
    lines go to the stdout it saw at import): in Lambda that is CloudWatch, here it
    would bury the table. The write still happens, as in Lambda, into /dev/null.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
