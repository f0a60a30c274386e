"""Cold start: what a fresh container imports for its first invocation.

Each handler runs in a new interpreter, as a new Lambda container would, with every
setting in its environment (no SSM) and the live Redis and Postgres behind it. A direct
invoke or a scheduled run must not load Powertools' API Gateway resolver (about 100 ms),
and a call that never reaches Sonos must not load ``requests``; an API event arriving
later in the same container still gets the resolver and a full answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT
from tests.support.answer_checks import refresher_summary
from tests.support.handlers import load_event
from tests.support.secret_guard import SecretGuard, without_fetched_token
from token_manager.crypto import KeyRing, TokenCipher
from token_manager.models import NewGrant
from token_manager.store.postgres import PostgresTokenStore

pytestmark = pytest.mark.integration

RESOLVER = "aws_lambda_powertools.event_handler"
HTTP_CLIENT = "requests"
WATCHED = (RESOLVER, HTTP_CLIENT)
CLIENT_SECRET = "client-secret-MARKER-cold-imports-5b1e"
ACCESS = "access-MARKER-cold-imports-0001"
REFRESH = "refresh-MARKER-cold-imports-0001"
CHILD_TIMEOUT_SEC = 60

# Runs in the fresh interpreter: load the handler as Lambda would, answer each event, and
# after each answer note which of the watched modules the process has loaded.
CHILD = """
import importlib.util, json, sys
from tests.support.handlers import LambdaContextStub
name, events, watched = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("app", f"functions/{name}/app.py")
handler = importlib.util.module_from_spec(spec)
spec.loader.exec_module(handler)
steps = [{"after": "import", "loaded": [m for m in watched if m in sys.modules]}]
for event in events:
    answer = handler.lambda_handler(event, LambdaContextStub())
    steps.append({"after": "invocation", "answer": answer, "loaded": [m for m in watched if m in sys.modules]})
print("CHILD_RESULT " + json.dumps(steps))
"""


@dataclass(frozen=True)
class Step:
    loaded: frozenset[str]
    answer: Any = None


@dataclass
class Container:
    """Starts fresh "containers" (interpreters) with the service's settings in their environment."""

    environment: dict[str, str]
    guard: SecretGuard

    def run(self, function: str, *events: Any) -> list[Step]:
        """The modules loaded after the import and after each event, with each answer."""
        completed = subprocess.run(
            [sys.executable, "-c", CHILD, function, json.dumps(events), json.dumps(WATCHED)],
            capture_output=True,
            text=True,
            env=self.environment,
            cwd=ROOT,
            timeout=CHILD_TIMEOUT_SEC,
            check=False,
        )
        # The child's log lines and answers are the service's output, checked for secrets like any other.
        self.guard.seen(completed.stderr, f"{function} stderr")
        lines = [line for line in completed.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert lines, completed.stdout[-3000:]
        self.guard.seen("\n".join(line for line in completed.stdout.splitlines() if line not in lines))
        steps = [Step(frozenset(step["loaded"]), step.get("answer")) for step in json.loads(lines[-1].split(" ", 1)[1])]
        for step in steps:
            self.guard.seen(without_fetched_token(step.answer), f"the {function} answer")
        return steps


@pytest.fixture
def ring(secret_guard: SecretGuard) -> KeyRing:
    ring = KeyRing.generate()
    secret_guard.add_key_ring(ring.to_json())
    secret_guard.add(CLIENT_SECRET, ACCESS, REFRESH)
    return ring


@pytest.fixture
def container(migrated_database: str, redis_url: str, ring: KeyRing, secret_guard: SecretGuard) -> Container:
    layer = ROOT / "layers" / "token_manager"
    environment = {
        name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "TOKEN_ENCRYPTION_KEYS")
    }
    environment.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(layer)]),
            "ENV": "dev",
            "SONOS_CLIENT_ID": "client-id-cold-imports",
            "SONOS_CLIENT_SECRET": CLIENT_SECRET,
            "SONOS_REDIRECT_URI": "https://app.example.test/sonos/callback",
            "TOKEN_ENCRYPTION_KEYS": ring.to_json(),
            "DATABASE_URL": migrated_database,
            "REDIS_URL": redis_url,
            "SUPABASE_URL": "",
            "SUPABASE_SERVICE_ROLE_KEY": "",
            # Nothing here may reach Sonos: a call would fail at once on this closed port.
            "SONOS_AUTH_BASE_URL": "http://127.0.0.1:9",
            "SONOS_CONTROL_BASE_URL": "http://127.0.0.1:9/control/api/v1",
            "SONOS_REVOKE_URL": "",
            "EVENT_BUS_NAME": "",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return Container(environment, secret_guard)


@pytest.fixture
def linked_user(migrated_database: str, redis_url: str, ring: KeyRing) -> Iterator[str]:
    """A grant a day from expiry, nothing cached for it yet."""
    user_id = f"cold-imports-{uuid.uuid4().hex[:12]}"
    cipher = TokenCipher(ring)
    now = datetime.now(UTC)
    store = PostgresTokenStore(migrated_database)
    try:
        store.link(
            NewGrant(
                user_id=user_id,
                household_id="Sonos_ColdImports.Household1",
                household_ids=("Sonos_ColdImports.Household1",),
                access_token_encrypted=cipher.encrypt(ACCESS, user_id=user_id, field="access_token"),
                refresh_token_encrypted=cipher.encrypt(REFRESH, user_id=user_id, field="refresh_token"),
                encryption_key_id=ring.active_key_id,
                expires_at=now + timedelta(days=1),
                scope="playback-control-all",
                last_refreshed_at=now,
            )
        )
    finally:
        store.close()
    yield user_id
    redis.Redis.from_url(redis_url).delete(f"sonos:token:{user_id}")


def fetch_api_event(user_id: str) -> dict[str, Any]:
    event = load_event("token_fetch_api.json")
    event["queryStringParameters"] = {"userId": user_id}
    event["multiValueQueryStringParameters"] = {"userId": [user_id]}
    return event


# --------------------------------------------------------------------------- direct invokes and schedules


def test_a_fetch_answered_from_the_cache_loads_neither_the_resolver_nor_the_http_client(
    container: Container, linked_user: str, redis_url: str
) -> None:
    (_, miss) = container.run("token_fetch", {"userId": linked_user})
    assert miss.answer["accessToken"] == ACCESS
    assert redis.Redis.from_url(redis_url).exists(f"sonos:token:{linked_user}"), "the first fetch fills the cache"

    imported, hit = container.run("token_fetch", {"userId": linked_user})

    assert imported.loaded == frozenset()
    assert hit.answer["accessToken"] == ACCESS
    assert hit.loaded == frozenset(), "a fetch from the cache needs neither the API resolver nor requests"
    assert miss.loaded == frozenset(), "nor does one from the store while the token is fresh"


def test_an_api_event_after_a_direct_fetch_loads_the_resolver_and_answers(
    container: Container, linked_user: str
) -> None:
    _, direct, over_api = container.run("token_fetch", {"userId": linked_user}, fetch_api_event(linked_user))

    assert RESOLVER not in direct.loaded
    assert over_api.answer["statusCode"] == 200
    assert json.loads(over_api.answer["body"])["accessToken"] == ACCESS
    assert over_api.answer["multiValueHeaders"]["Cache-Control"] == ["no-store"]
    assert RESOLVER in over_api.loaded
    assert HTTP_CLIENT not in over_api.loaded


def test_an_api_event_first_is_answered_with_the_resolvers_validation(container: Container) -> None:
    event = fetch_api_event("u")
    event["queryStringParameters"] = event["multiValueQueryStringParameters"] = None

    _, refused = container.run("token_fetch", event)

    assert refused.answer["statusCode"] == 400
    assert json.loads(refused.answer["body"]) == {
        "error": {"code": "invalid_request", "message": "userId is required."}
    }


def test_a_refresher_run_with_nothing_due_loads_neither(container: Container, linked_user: str) -> None:
    imported, run = container.run("token_refresher", load_event("token_refresher_schedule.json"))

    assert run.answer == refresher_summary()
    assert imported.loaded == run.loaded == frozenset()


def test_revoking_an_unlinked_user_loads_neither(container: Container) -> None:
    imported, revoked = container.run("token_revoke", {"userId": f"never-linked-{uuid.uuid4().hex[:8]}"})

    assert revoked.answer == {"revoked": False, "providerRevoked": False}
    assert imported.loaded == revoked.loaded == frozenset()


def test_initiate_by_direct_invoke_does_not_load_the_resolver(container: Container) -> None:
    imported, started = container.run("oauth_initiate", {"userId": f"cold-imports-{uuid.uuid4().hex[:8]}"})

    assert started.answer["expiresIn"] == 600
    assert RESOLVER not in imported.loaded | started.loaded  # the authorize URL is built by the Sonos client


def test_key_rotation_refusing_a_ring_from_the_environment_loads_neither(container: Container) -> None:
    imported, refused = container.run("key_rotation", {})

    assert refused.answer["error"]["code"] == "configuration_error"
    assert imported.loaded == refused.loaded == frozenset()


def test_the_callback_refusing_a_direct_payload_does_not_load_the_resolver(container: Container) -> None:
    imported, refused = container.run("oauth_callback", {"code": "c", "state": "s"})

    assert refused.answer["error"]["code"] == "invalid_request"
    assert imported.loaded == refused.loaded == frozenset()


def test_every_handler_loads_without_the_resolver_or_the_http_client(container: Container) -> None:
    functions = sorted(path.parent.name for path in Path(ROOT, "functions").glob("*/app.py"))
    assert len(functions) == 6
    for function in functions:
        (imported,) = container.run(function)
        assert imported.loaded == frozenset(), function
