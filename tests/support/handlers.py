"""Load the Lambda handlers by path (functions/<name>/app.py) and invoke them with a stand-in context."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = ROOT / "functions"
EVENTS_DIR = ROOT / "events"

FUNCTION_NAMES = ("oauth_initiate", "oauth_callback", "token_fetch", "token_revoke", "token_refresher", "key_rotation")
# SAM logical ids (events/env.json sections) of each function.
LOGICAL_IDS = {
    "oauth_initiate": "OAuthInitiateFunction",
    "oauth_callback": "OAuthCallbackFunction",
    "token_fetch": "TokenFetchFunction",
    "token_revoke": "TokenRevokeFunction",
    "token_refresher": "TokenRefresherFunction",
    "key_rotation": "KeyRotationFunction",
}

_loads = itertools.count(1)


def load_handler(name: str) -> ModuleType:
    """A fresh copy of ``functions/<name>/app.py`` under a module name of its own.

    Every function's file is called ``app.py``, so they cannot be imported by name side
    by side; a fresh copy is also what a new container would run.
    """
    if name not in FUNCTION_NAMES:
        raise ValueError(f"unknown function {name!r}")
    path = FUNCTIONS_DIR / name / "app.py"
    module_name = f"handler_{name}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_event(file_name: str) -> dict[str, Any]:
    """A sample event from events/, as a fresh dict the caller may change."""
    event: dict[str, Any] = json.loads((EVENTS_DIR / file_name).read_text())
    return event


def function_for_event(file_name: str) -> str:
    """The function a sample event file belongs to (its name starts with the function's)."""
    for name in sorted(FUNCTION_NAMES, key=len, reverse=True):
        if file_name.startswith(name + "_"):
            return name
    raise ValueError(f"no function for event file {file_name!r}")


def sample_event_files() -> list[str]:
    return sorted(path.name for path in EVENTS_DIR.glob("*.json") if path.name != "env.json")


def function_env(name: str) -> dict[str, str]:
    """The environment events/env.json gives a function (what `sam local invoke --env-vars` passes)."""
    sections: dict[str, dict[str, str]] = json.loads((EVENTS_DIR / "env.json").read_text())
    return dict(sections[LOGICAL_IDS[name]])


@dataclass
class LambdaContextStub:
    """The parts of the Lambda context the handlers and Powertools read."""

    function_name: str = "sonos-token-service-test"
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    remaining_ms: int = 240_000

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@contextmanager
def captured_service_logs(level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    """Everything the Powertools handler writes (the service's JSON log lines) during the block.

    The layer's loggers are routed into Powertools as a handler module does on import,
    and put back afterwards, so other test modules keep their usual logging.
    """
    from token_manager import observability

    layer = logging.getLogger(observability.LAYER_LOGGER_NAME)
    saved_layer = (list(layer.handlers), layer.propagate, layer.level)
    saved_level = observability.logger.log_level
    observability.logger.setLevel(level)
    observability.route_layer_logs()
    handler = observability.logger.logger_handler
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    # Swapped without setStream(): that flushes the old stream, which may be a pytest
    # capture already closed (the handler keeps whatever stdout was when it was made).
    previous, handler.stream = handler.stream, stream
    try:
        yield stream
    finally:
        handler.stream = previous
        observability.logger.setLevel(saved_level)
        layer.handlers[:] = saved_layer[0]
        layer.propagate = saved_layer[1]
        layer.setLevel(saved_layer[2])


def handler_environment(
    *,
    client_id: str,
    client_secret: str,
    redirect_uri: str,
    key_ring_json: str,
    database_url: str,
    redis_url: str,
    auth_base_url: str,
    control_base_url: str,
) -> dict[str, str]:
    """Every setting the handlers read, from the environment (no SSM), for in-process runs."""
    return {
        "ENV": "dev",
        "SONOS_CLIENT_ID": client_id,
        "SONOS_CLIENT_SECRET": client_secret,
        "SONOS_REDIRECT_URI": redirect_uri,
        "TOKEN_ENCRYPTION_KEYS": key_ring_json,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SUPABASE_URL": "",
        "SUPABASE_SERVICE_ROLE_KEY": "",
        "SONOS_AUTH_BASE_URL": auth_base_url,
        "SONOS_CONTROL_BASE_URL": control_base_url,
        "SONOS_REVOKE_URL": "",  # Sonos documents no revocation endpoint
        "SONOS_SCOPE": "playback-control-all",
        "SONOS_LINK_SUCCESS_URL": "",
        "SONOS_LINK_FAILURE_URL": "",
        "EVENT_BUS_NAME": "",
        "REFRESH_AHEAD_SECONDS": "300",
        "SSM_PARAMETER_MAX_AGE_SECONDS": "300",
        "SONOS_HTTP_TIMEOUT_SECONDS": "4",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
    }


_KEEP: Any = object()


def api_event(file_name: str, *, query: Any = _KEEP, body: Any = _KEEP, **fields: Any) -> Any:
    """A sample API Gateway event (events/) with its query string and/or body replaced."""
    event = load_event(file_name)
    if query is not _KEEP:
        event["queryStringParameters"] = query
        event["multiValueQueryStringParameters"] = None if query is None else {k: [v] for k, v in query.items()}
    if body is not _KEEP:
        event["body"] = body if body is None or isinstance(body, str) else json.dumps(body)
    event.update(fields)
    return event


def header(answer: dict[str, Any], name: str) -> str | None:
    """A header of a proxy answer, case-insensitively; the last value of a multi-value one."""
    for key, values in (answer.get("multiValueHeaders") or {}).items():
        if key.lower() == name.lower():
            return str(values[-1])
    for key, value in (answer.get("headers") or {}).items():
        if key.lower() == name.lower():
            return str(value)
    return None
