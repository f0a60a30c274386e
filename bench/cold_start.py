"""Cold start of each of the six handlers in a fresh interpreter, against a bare boto3 + Powertools handler.

Every run is a new ``python bench/cold_start_child.py`` process: the handler's imports
plus its first invocation (settings read from SSM in one batched call, the parts that
invocation needs built, the work done). SSM is served locally by moto's
ThreadedMotoServer with the parameters under ``/storytailor-dev/...``, boto3 pointed at
it with ``AWS_ENDPOINT_URL_SSM``; only ``DATABASE_URL`` and the Sonos URLs come from the
environment. The baseline handler imports boto3, Powertools Logger and Parameters and
makes the same ``get_parameters_by_name`` call for the same names.

The six functions run with ``DATABASE_URL`` (the direct Postgres store, psycopg). The
template's default is the Supabase store (PostgREST over HTTPS), so ``token_fetch`` also
runs with that store configured: a cache hit builds the store but sends it nothing.

Locally every module has its bytecode cached. A SAM-built layer ships none and /opt is
read-only, so on Lambda the layer's modules are compiled at every cold start. The
"as deployed" rows emulate that: a ``PYTHONPYCACHEPREFIX`` holding bytecode only for
the standard library and what the Lambda runtime provides compiled (boto3 & co), and
X-Ray tracing on (template.yaml has ``Tracing: Active``; outside Lambda the service
leaves it off, so the other rows run without it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import Row
from bench.services import ROOT, BenchServices, child_env, fresh_grant, seed_grants
from bench.stats import median

SECTION = "cold start (import + 1st invocation)"
FUNCTIONS = ("oauth_initiate", "oauth_callback", "token_fetch", "token_revoke", "token_refresher", "key_rotation")
RATIO_TARGET = 1.4
RSS_TARGET_MB = 100.0
SSM_PREFIX = "/storytailor-dev"
REGION = "us-east-1"
FETCH_USER = "bench-cold-fetch"
CHILD_TIMEOUT_SEC = 60
# Compiled by the Lambda Python runtime (boto3 with its dependencies); the rest of requirements.txt is the layer's.
RUNTIME_COMPILED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six"})
AS_DEPLOYED = ("bare", "token_fetch")
# The production default store (template.yaml without DatabaseUrl). A cache hit sends the store
# nothing, so an address where nothing listens will do: a request would fail the run, not pass it.
SUPABASE_STORE_ENV = {
    "DATABASE_URL": "",
    "SUPABASE_URL": "http://127.0.0.1:9",
    "SUPABASE_SERVICE_ROLE_KEY": "bench-not-a-service-role-key",
}
SUPABASE_FETCH = "token_fetch, Supabase store (the default; a cache hit)"
# What makes the service trace as in Lambda (observability.tracing_enabled); the segments go to
# a daemon address where nothing listens, as UDP datagrams nobody reads.
LAMBDA_TRACING_ENV = {
    "LAMBDA_TASK_ROOT": str(ROOT / "functions" / "token_fetch"),
    "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
    "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:2000",
    "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
}


@dataclass(frozen=True)
class ColdStart:
    import_ms: float
    total_ms: float
    rss_mb: float


def run(services: BenchServices, *, runs: int) -> list[Row]:
    import psycopg

    with psycopg.connect(services.database_url, autocommit=True) as connection:
        connection.execute("truncate sonos_tokens")  # key rotation re-encrypts every row: keep it to one
    seed_grants(services.database_url, services.key_ring_json, [fresh_grant(FETCH_USER)])
    events = _first_events()
    results: dict[str, list[ColdStart]] = {name: [] for name in ("bare", *FUNCTIONS)}
    deployed: dict[str, list[ColdStart]] = {name: [] for name in AS_DEPLOYED}
    supabase_fetch: list[ColdStart] = []
    with _local_ssm(services) as ssm_env, _bytecode(ssm_env, events) as (env, deployed_env):
        for _ in range(runs):
            # Round robin, so a noisy moment of the machine spreads over every function.
            for name in results:
                results[name].append(_cold_start(name, events.get(name, {}), env))
                if name == "token_fetch":  # right after the Postgres fetch that keeps the cache filled
                    supabase_fetch.append(_cold_start(name, events[name], {**env, **SUPABASE_STORE_ENV}))
            for name in deployed:
                deployed[name].append(_cold_start(name, events.get(name, {}), deployed_env))

    bare_total = median([r.total_ms for r in results["bare"]])
    rows = [
        Row(
            SECTION,
            "bare handler: boto3 + Powertools Logger/Parameters + 1 SSM read",
            bare_total,
            "ms",
            note=f"peak RSS {median([r.rss_mb for r in results['bare']]):.0f} MB",
        )
    ]
    for name in FUNCTIONS:
        runs_of = results[name]
        total = median([r.total_ms for r in runs_of])
        # The ratio per run against that run's baseline, then the median.
        ratio = median([r.total_ms / b.total_ms for r, b in zip(runs_of, results["bare"], strict=True)])
        rows += [
            Row(SECTION, f"{name}", total, "ms", note=f"import {median([r.import_ms for r in runs_of]):.0f} ms"),
            Row(SECTION, f"{name} / bare handler", ratio, "x", RATIO_TARGET, digits=2),
            Row(SECTION, f"{name} peak RSS", median([r.rss_mb for r in runs_of]), "MB", RSS_TARGET_MB),
        ]
    supabase_ratio = median([r.total_ms / b.total_ms for r, b in zip(supabase_fetch, results["bare"], strict=True)])
    rows += [
        Row(
            SECTION,
            SUPABASE_FETCH,
            median([r.total_ms for r in supabase_fetch]),
            "ms",
            note=f"import {median([r.import_ms for r in supabase_fetch]):.0f} ms",
        ),
        Row(SECTION, f"{SUPABASE_FETCH} / bare handler", supabase_ratio, "x", RATIO_TARGET, digits=2),
        Row(SECTION, f"{SUPABASE_FETCH} peak RSS", median([r.rss_mb for r in supabase_fetch]), "MB", RSS_TARGET_MB),
    ]
    deployed_ratio = median(
        [f.total_ms / b.total_ms for f, b in zip(deployed["token_fetch"], deployed["bare"], strict=True)]
    )
    deployed_rss = median([r.rss_mb for r in deployed["token_fetch"]])
    rows += [
        Row(
            SECTION,
            "as deployed (layer without .pyc, tracing on): bare handler",
            median([r.total_ms for r in deployed["bare"]]),
            "ms",
        ),
        Row(
            SECTION,
            "as deployed (layer without .pyc, tracing on): token_fetch",
            median([r.total_ms for r in deployed["token_fetch"]]),
            "ms",
            note=f"{deployed_ratio:.2f} x the bare handler, peak RSS {deployed_rss:.0f} MB",
        ),
    ]
    return rows


@contextlib.contextmanager
def _bytecode(env: dict[str, str], events: dict[str, Any]) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The children's environments: every module's bytecode cached, and bytecode as on Lambda.

    Both read bytecode from a ``PYTHONPYCACHEPREFIX`` of the bench's own, filled by one
    run of every child, so the figures do not depend on what this checkout has cached
    or on PYTHONDONTWRITEBYTECODE in the caller's shell. The Lambda-like copy keeps it
    only for the standard library and the runtime's boto3 & co: the layer's packages,
    ``token_manager`` and the handler are compiled at import, as from a read-only /opt.
    """
    scratch = Path(tempfile.mkdtemp(prefix="bench-pycache-"))
    try:
        cached, deployed = scratch / "cached", scratch / "deployed"
        filling = {name: value for name, value in env.items() if name != "PYTHONDONTWRITEBYTECODE"}
        filling["PYTHONPYCACHEPREFIX"] = str(cached)
        for name in ("bare", *FUNCTIONS):
            _cold_start(name, events.get(name, {}), filling)
        _cold_start("token_fetch", events["token_fetch"], {**filling, **SUPABASE_STORE_ENV})  # httpx, postgrest
        shutil.copytree(cached, deployed)
        site_packages = deployed / Path(sysconfig.get_paths()["purelib"]).relative_to("/")
        for entry in site_packages.iterdir():
            if entry.name.split(".")[0] in RUNTIME_COMPILED:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.rmtree(deployed / ROOT.relative_to("/"), ignore_errors=True)  # the layer's package, the handlers
        frozen = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
        yield (
            {**frozen, "PYTHONPYCACHEPREFIX": str(cached)},
            {**frozen, **LAMBDA_TRACING_ENV, "PYTHONPYCACHEPREFIX": str(deployed)},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _first_events() -> dict[str, Any]:
    from tests.support.handlers import load_event

    return {
        "oauth_initiate": {"userId": "bench-cold-initiate"},
        # An unknown state: the full wiring (settings, Redis, store, Sonos client), answered 400 in the browser.
        "oauth_callback": load_event("oauth_callback_denied_api.json"),
        "token_fetch": {"userId": FETCH_USER},
        "token_revoke": {"userId": "bench-cold-not-linked"},
        "token_refresher": load_event("token_refresher_schedule.json"),
        "key_rotation": {},
    }


def _cold_start(name: str, event: Any, env: dict[str, str]) -> ColdStart:
    completed = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(ROOT / "bench" / "cold_start_child.py"), name, json.dumps(event)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=CHILD_TIMEOUT_SEC,
        check=False,
    )
    marker = "COLD_START_RESULT "
    lines = [line for line in completed.stdout.splitlines() if line.startswith(marker)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"cold start of {name} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    result = json.loads(lines[-1].removeprefix(marker))
    _check_answer(name, result["answer"])
    return ColdStart(result["import_ms"], result["total_ms"], result["rss_mb"])


def _check_answer(name: str, answer: Any) -> None:
    """A cold start that failed fast would look cheap: each answer must be the expected one."""
    expected_keys = {
        "bare": "read",
        "oauth_initiate": "authorizationUrl",
        "token_fetch": "accessToken",
        "token_revoke": "revoked",
        "token_refresher": "scanned",
        "key_rotation": None,
    }
    if name == "oauth_callback":
        ok = isinstance(answer, dict) and answer.get("statusCode") == 400  # invalid_state page, as intended
    elif name == "key_rotation":
        ok = isinstance(answer, dict) and "error" not in answer
    else:
        ok = isinstance(answer, dict) and expected_keys[name] in answer
        if name == "bare":
            ok = ok and len(answer["read"]) > 0
    if not ok:
        raise RuntimeError(f"cold start of {name}: unexpected answer {str(answer)[:300]}")


@contextlib.contextmanager
def _local_ssm(services: BenchServices) -> Iterator[dict[str, str]]:
    """A moto SSM server holding the service's settings; yields the children's environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # it announces itself on stdout
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        settings = services.handler_settings()
        from_ssm = {
            "sonos/client-id": ("SONOS_CLIENT_ID", "String"),
            "sonos/client-secret": ("SONOS_CLIENT_SECRET", "SecureString"),
            "sonos/redirect-uri": ("SONOS_REDIRECT_URI", "String"),
            "sonos/token-encryption-keys": ("TOKEN_ENCRYPTION_KEYS", "SecureString"),
            "redis/url": ("REDIS_URL", "SecureString"),
        }
        aws = {
            "AWS_ENDPOINT_URL_SSM": endpoint,
            # moto accepts any credentials; these only let boto3 sign its requests.
            "AWS_ACCESS_KEY_ID": "bench-local-ssm",
            "AWS_SECRET_ACCESS_KEY": "bench-local-ssm",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        ssm = boto3.client("ssm", endpoint_url=endpoint, region_name=REGION, **_credentials(aws))
        for suffix, (variable, kind) in from_ssm.items():
            ssm.put_parameter(Name=f"{SSM_PREFIX}/{suffix}", Value=settings[variable], Type=kind, Overwrite=True)
        env = child_env()
        env.update(settings)
        env.update({variable: "" for variable, _ in from_ssm.values()})  # read from SSM, as deployed
        env.update(aws)
        env["BENCH_SSM_NAMES"] = ",".join(f"{SSM_PREFIX}/{suffix}" for suffix in from_ssm)
        yield env
    finally:
        server.stop()


def _credentials(aws: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": aws["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"]}
