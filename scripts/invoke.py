"""`make invoke`: every sample event in events/ through its handler, in-process, against throwaway services.

Run it inside scripts/with-services.sh (which exports REDIS_URL and DATABASE_URL):

    scripts/with-services.sh .venv/bin/python scripts/invoke.py [--verbose]
    make invoke FN=token_fetch EVENT=events/token_fetch_direct.json    # one event only

Each function gets the settings events/env.json gives it (what `sam local invoke
--env-vars events/env.json` passes), overridden by the live REDIS_URL / DATABASE_URL
and by a Sonos stand-in for the SONOS_* URLs. The key ring is moved from the
environment into a local SSM (a moto server), where production keeps it, so key
rotation runs as it would in AWS. Every function starts in a fresh "container".

The sample user is linked first through the real flow (initiate -> the stand-in's
consent page -> callback), using the sample events themselves. Prints each event, the
status and a short summary of the answer (an access token only by its length), and
exits 1 if any answer is a 5xx.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "layers" / "token_manager")]

from devtools.sonos_standin import SonosStandIn, StandInConfig  # noqa: E402
from tests.support.handlers import (  # noqa: E402
    LambdaContextStub,
    function_env,
    function_for_event,
    load_event,
    load_handler,
    sample_event_files,
)

KEY_RING_PARAMETER = "/storytailor-{env}/sonos/token-encryption-keys"
REGION = "us-east-1"
SECRET_QUERY_KEYS = ("code",)


@dataclass
class Step:
    """One sample event, and how it is adapted to this run (state from the flow, a real household)."""

    file_name: str
    note: str = ""
    adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None


@dataclass
class Run:
    sonos: SonosStandIn
    base_env: dict[str, str]
    verbose: bool
    failures: list[str] = field(default_factory=list)
    flow: dict[str, str] = field(default_factory=dict)  # values carried from one step to the next
    _function: str | None = None
    _module: ModuleType | None = None

    def invoke(self, step: Step) -> Any:
        function = function_for_event(step.file_name)
        event = load_event(step.file_name)
        if step.adapt is not None:
            event = step.adapt(event)
        module = self._container(function)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # Powertools prints EMF metrics; logs have their own stream
            answer = module.lambda_handler(event, LambdaContextStub(function_name=f"sonos-{function}-local"))
        if self.verbose:
            print(printed.getvalue(), end="")
        status, summary = summarize(answer)
        kind = "API" if "httpMethod" in event else "direct"
        print(f"events/{step.file_name} -> {function} ({kind}){'  [' + step.note + ']' if step.note else ''}")
        print(f"    {status}  {summary}")
        if status >= 500:
            self.failures.append(step.file_name)
        return answer

    def _container(self, function: str) -> ModuleType:
        """A fresh container per function: its own environment, nothing built, the handler loaded anew."""
        if function == self._function and self._module is not None:
            return self._module
        from token_manager import runtime

        runtime.reset_for_tests()
        for name, value in function_settings(function, self.base_env).items():
            os.environ[name] = value
        self._function, self._module = function, load_handler(function)
        return self._module


# --------------------------------------------------------------------------- settings


def function_settings(function: str, live: dict[str, str]) -> dict[str, str]:
    settings = function_env(function)
    settings.update(live)
    return settings


@contextlib.contextmanager
def local_ssm() -> Iterator[dict[str, str]]:
    """A moto SSM server on loopback, and the environment that points boto3 at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # it announces itself on stdout
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    try:
        host, port = server.get_host_and_port()
        yield {
            "AWS_ENDPOINT_URL_SSM": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "local-ssm-stand-in",
            "AWS_SECRET_ACCESS_KEY": "local-ssm-stand-in",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        server.stop()


def put_key_ring(endpoint: str, name: str, ring_json: str) -> None:
    import boto3

    ssm = boto3.client("ssm", endpoint_url=endpoint, region_name=REGION)
    ssm.put_parameter(Name=name, Value=ring_json, Type="SecureString", Overwrite=True)


# --------------------------------------------------------------------------- the plan


def with_query(**values: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def adapt(event: dict[str, Any]) -> dict[str, Any]:
        query = dict(event.get("queryStringParameters") or {})
        query.update(values)
        event["queryStringParameters"] = query
        event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()}
        return event

    return adapt


def callback_query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def link_sample_user(run: Run) -> None:
    """Initiate -> Allow on the stand-in's consent page -> callback, for the sample user."""
    initiated = run.invoke(Step("oauth_initiate_direct.json"))
    url = initiated.get("authorizationUrl") if isinstance(initiated, dict) else None
    linked = callback_query(run.sonos.approve(url, account="sample-account")) if url else {}
    run.invoke(
        Step(
            "oauth_callback_api.json",
            "code and state from the flow above",
            with_query(code=linked.get("code", ""), state=linked.get("state", "")),
        )
    )


def run_plan(run: Run) -> None:
    # 1. Link the sample user.
    link_sample_user(run)
    # 2. A second flow that the user denies.
    started = run.invoke(Step("oauth_initiate_api.json"))
    body = json.loads(started.get("body") or "{}")
    denied = callback_query(run.sonos.deny(body["authorizationUrl"])) if "authorizationUrl" in body else {}
    run.invoke(
        Step(
            "oauth_callback_denied_api.json",
            "state from the denied flow above",
            with_query(state=denied.get("state", "")),
        )
    )
    # 3. Tokens, the refresher, key rotation, tokens again under the rotated ring, then revoke.
    fetched = run.invoke(Step("token_fetch_direct.json"))
    households = (fetched.get("householdIds") if isinstance(fetched, dict) else None) or []
    run.invoke(Step("token_fetch_api.json"))
    second = households[-1] if households else ""

    def other_household(event: dict[str, Any]) -> dict[str, Any]:
        event["householdId"] = second
        return event

    run.invoke(
        Step("token_fetch_household_direct.json", "householdId: the linked account's second household", other_household)
    )
    run.invoke(Step("token_refresher_schedule.json"))
    run.invoke(Step("key_rotation_schedule.json"))
    run.invoke(Step("key_rotation_direct.json"))
    run.invoke(Step("token_fetch_direct.json", "again, after the rotations"))
    run.invoke(Step("token_revoke_api.json"))
    run.invoke(Step("token_revoke_direct.json", "again: idempotent"))


PLANNED = {
    "oauth_initiate_direct.json",
    "oauth_callback_api.json",
    "oauth_initiate_api.json",
    "oauth_callback_denied_api.json",
    "token_fetch_direct.json",
    "token_fetch_api.json",
    "token_fetch_household_direct.json",
    "token_refresher_schedule.json",
    "key_rotation_schedule.json",
    "key_rotation_direct.json",
    "token_revoke_api.json",
    "token_revoke_direct.json",
}


# --------------------------------------------------------------------------- answers


def summarize(answer: Any) -> tuple[int, str]:
    """The status and a one-line summary; an access token appears only as its length."""
    if isinstance(answer, dict) and "statusCode" in answer:
        status = int(answer["statusCode"])
        headers = {k.lower(): v[-1] if isinstance(v, list) else v for k, v in _headers(answer).items()}
        if "location" in headers:
            return status, f"redirect to {headers['location']}"
        body = answer.get("body") or ""
        if headers.get("content-type", "").startswith("text/html"):
            title = re.search(r"<h1>(.*?)</h1>", body)
            return status, f"HTML page: {title.group(1) if title else '(untitled)'}"
        try:
            return status, describe(json.loads(body))
        except ValueError:
            return status, f"{len(body)} bytes"
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        return int(error.get("status", 500)), f"error {error.get('code')}: {error.get('message')}"
    return 200, describe(answer)


def _headers(answer: dict[str, Any]) -> dict[str, Any]:
    return {**(answer.get("headers") or {}), **(answer.get("multiValueHeaders") or {})}


def describe(body: Any) -> str:
    if not isinstance(body, dict):
        return json.dumps(body)[:200]
    if isinstance(body.get("error"), dict):
        return f"error {body['error'].get('code')}: {body['error'].get('message')}"
    shown: dict[str, Any] = {}
    for key, value in body.items():
        if key == "accessToken":
            shown[key] = f"<{len(str(value))} characters>"
        elif key == "authorizationUrl":
            url = urlsplit(str(value))
            shown[key] = f"{url.scheme}://{url.netloc}{url.path}?..."
        else:
            shown[key] = value
    return json.dumps(shown, separators=(", ", ": "))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--verbose", action="store_true", help="show the service's INFO logs and EMF metrics")
    parser.add_argument("--event", help="run only this file of events/ (after linking the sample user)")
    parser.add_argument("--function", help="with --event: the function it must belong to (e.g. token_fetch)")
    args = parser.parse_args(argv)
    only = Path(args.event).name if args.event else None
    if only is not None and only not in sample_event_files():
        print(f"{args.event}: not a sample event; choose one of {', '.join(sample_event_files())}")
        return 2
    if only is not None and args.function and function_for_event(only) != args.function:
        print(f"{only} is an event for {function_for_event(only)}, not {args.function}")
        return 2
    live = {name: os.environ.get(name, "") for name in ("REDIS_URL", "DATABASE_URL")}
    if not all(live.values()):
        print("REDIS_URL and DATABASE_URL are not set: run through scripts/with-services.sh (make invoke)")
        return 2

    sample_env = function_env("token_fetch")
    ring_json = sample_env["TOKEN_ENCRYPTION_KEYS"]
    config = StandInConfig(
        client_id=sample_env["SONOS_CLIENT_ID"], client_secret=sample_env["SONOS_CLIENT_SECRET"], households=2
    )
    with local_ssm() as aws_env, SonosStandIn(config) as sonos:
        overrides = {
            **live,
            **aws_env,
            "TOKEN_ENCRYPTION_KEYS": "",  # read from the local SSM instead
            "SONOS_AUTH_BASE_URL": sonos.url,
            "SONOS_CONTROL_BASE_URL": sonos.control_url,
            "SONOS_REVOKE_URL": sonos.revoke_url,
            "POWERTOOLS_TRACE_DISABLED": "true",
            "LOG_LEVEL": "INFO" if args.verbose else "WARNING",
        }
        os.environ.update(overrides)  # before the first handler loads: Powertools reads them at import
        put_key_ring(aws_env["AWS_ENDPOINT_URL_SSM"], KEY_RING_PARAMETER.format(env=sample_env["ENV"]), ring_json)
        run = Run(sonos=sonos, base_env=overrides, verbose=args.verbose)
        if only is not None:
            link_sample_user(run)
            run.invoke(Step(only, "as given"))
        else:
            run_plan(run)
            for file_name in sample_event_files():
                if file_name not in PLANNED:  # a sample added later still runs, as it is
                    run.invoke(Step(file_name, "not in the plan: run as it is"))

    if run.failures:
        print(f"\n{len(run.failures)} answer(s) were 5xx: {', '.join(run.failures)}")
        return 1
    print(f"\n{only or 'every sample event'} answered without a 5xx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
