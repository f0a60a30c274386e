"""The whole service on one machine: the Sonos stand-in, seeded settings, and the local API over the real handlers."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Final, Self

from devtools.http_serving import Running
from devtools.local_api import DEFAULT_TEMPLATE, DEMO_USER_ID, LocalApi
from devtools.sonos_standin import SonosStandIn, StandInConfig

DEFAULT_API_PORT: Final = 3000
DEFAULT_STANDIN_PORT: Final = 8710
LOCAL_CLIENT_ID: Final = "local-demo-client"
CALLBACK_PATH: Final = "/sonos/oauth/callback"
KEY_RING_PARAMETER: Final = "/storytailor-dev/sonos/token-encryption-keys"
LOCAL_REGION: Final = "us-east-1"


class LocalStack(Running):
    """A Sonos stand-in and a local API whose handlers read settings seeded to match it.

    The settings go into ``environ`` (the process environment by default), which is
    where the handlers' per-container wiring reads them at cold start: a fresh key
    ring, the stand-in's client id and a per-run secret, the stand-in's URLs, the
    services' ``REDIS_URL`` / ``DATABASE_URL``, and the local API's callback as the
    one registered redirect URI.

    With ``local_ssm=True`` the key ring lives where production keeps it, in the SSM
    parameter ``/storytailor-dev/sonos/token-encryption-keys``, served by a local
    moto SSM server (boto3 is pointed at it with ``AWS_ENDPOINT_URL_SSM`` and dummy
    credentials) instead of ``TOKEN_ENCRYPTION_KEYS``: the key rotation handler then
    runs unchanged, reading and writing the ring through SSM, and the other handlers
    pick the rotated ring up the way they would in AWS.

    Example::

        with LocalStack(redis_url=..., database_url=...) as stack:
            stack.api.url, stack.stand_in.url
    """

    def __init__(
        self,
        *,
        redis_url: str,
        database_url: str,
        api_port: int = 0,
        standin_port: int = 0,
        host: str = "127.0.0.1",
        standin_config: StandInConfig | None = None,
        refresh_ahead_seconds: int = 300,
        key_ring_json: str | None = None,
        extra_settings: dict[str, str] | None = None,
        template: Path = DEFAULT_TEMPLATE,
        demo_user_id: str = DEMO_USER_ID,
        local_ssm: bool = False,
        environ: MutableMapping[str, str] | None = None,
        api_log: Callable[[str], None] | None = None,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._client_secret = secrets.token_urlsafe(24)  # per run: nothing to leak from a fixed value
        self._standin_config = dataclasses.replace(
            standin_config or StandInConfig(), client_id=LOCAL_CLIENT_ID, client_secret=self._client_secret
        )
        self.stand_in = SonosStandIn(self._standin_config, host=host, port=standin_port)
        self.api = LocalApi(template, host=host, port=api_port, demo_user_id=demo_user_id, log=api_log)
        self._host = host
        self._redis_url = redis_url
        self._database_url = database_url
        self._refresh_ahead_seconds = refresh_ahead_seconds
        self._key_ring_json = key_ring_json
        self._extra_settings = dict(extra_settings or {})
        self._local_ssm = local_ssm
        self._ssm_server: Any = None
        self._saved_environment: dict[str, str | None] = {}
        self.settings: dict[str, str] = {}
        self.key_ring_json = ""

    @property
    def redirect_uri(self) -> str:
        return self.api.url + CALLBACK_PATH

    @property
    def client_id(self) -> str:
        return LOCAL_CLIENT_ID

    def start(self) -> Self:
        from token_manager.crypto import KeyRing  # the layer is importable once LocalApi put it on sys.path

        self.stand_in.start()
        try:
            self.api.start()
            self.stand_in.configure(redirect_uris=[self.redirect_uri])
            self.key_ring_json = self._key_ring_json or KeyRing.generate().to_json()
            self.settings = {
                "ENV": "dev",
                "SONOS_CLIENT_ID": LOCAL_CLIENT_ID,
                "SONOS_CLIENT_SECRET": self._client_secret,
                "SONOS_REDIRECT_URI": self.redirect_uri,
                "TOKEN_ENCRYPTION_KEYS": "" if self._local_ssm else self.key_ring_json,
                "REDIS_URL": self._redis_url,
                "DATABASE_URL": self._database_url,
                "SUPABASE_URL": "",
                "SUPABASE_SERVICE_ROLE_KEY": "",
                "SONOS_AUTH_BASE_URL": self.stand_in.url,
                "SONOS_CONTROL_BASE_URL": self.stand_in.control_url,
                "SONOS_REVOKE_URL": self.stand_in.revoke_url if self._standin_config.enable_revoke else "",
                "SONOS_SCOPE": "playback-control-all",
                "REFRESH_AHEAD_SECONDS": str(self._refresh_ahead_seconds),
                "SONOS_LINK_SUCCESS_URL": "",
                "SONOS_LINK_FAILURE_URL": "",
                "EVENT_BUS_NAME": "",  # no EventBridge locally: reconnect events are logged only
                **self._extra_settings,
            }
            if self._local_ssm:
                self.settings.update(self._start_local_ssm())
            for name, value in self.settings.items():
                self._saved_environment.setdefault(name, self._environ.get(name))
                self._environ[name] = value
            if self._local_ssm:
                self._put_key_ring_parameter()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def key_ring_parameter(self) -> str:
        return KEY_RING_PARAMETER

    def current_key_ring_json(self) -> str:
        """The ring the handlers use now: the SSM parameter's value with local SSM, else the seeded one."""
        if not self._local_ssm:
            return self.key_ring_json
        response = self._ssm_client().get_parameter(Name=KEY_RING_PARAMETER, WithDecryption=True)
        return str(response["Parameter"]["Value"])

    def _start_local_ssm(self) -> dict[str, str]:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per SSM call otherwise
        with contextlib.redirect_stdout(io.StringIO()):  # it announces itself on stdout
            server = ThreadedMotoServer(ip_address=self._host, port=0, verbose=False)
            server.start()
        self._ssm_server = server
        host, port = server.get_host_and_port()
        return {
            "AWS_ENDPOINT_URL_SSM": f"http://{host}:{port}",
            # moto accepts any credentials; these only let boto3 sign its requests.
            "AWS_ACCESS_KEY_ID": "local-ssm-stand-in",
            "AWS_SECRET_ACCESS_KEY": "local-ssm-stand-in",
            "AWS_DEFAULT_REGION": LOCAL_REGION,
            "AWS_REGION": LOCAL_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _ssm_client(self) -> Any:
        import boto3

        return boto3.client("ssm", endpoint_url=self.settings["AWS_ENDPOINT_URL_SSM"], region_name=LOCAL_REGION)

    def _put_key_ring_parameter(self) -> None:
        self._ssm_client().put_parameter(
            Name=KEY_RING_PARAMETER, Value=self.key_ring_json, Type="SecureString", Overwrite=True
        )

    def stop(self) -> None:
        # Settings first: the API then drops the template defaults it set, and the
        # environment is as it was before start().
        for name, value in self._saved_environment.items():
            if value is None:
                self._environ.pop(name, None)
            else:
                self._environ[name] = value
        self._saved_environment.clear()
        self.api.stop()
        self.stand_in.stop()
        if self._ssm_server is not None:
            self._ssm_server.stop()
            self._ssm_server = None


def _required_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"{name} is not set: run this through scripts/with-services.sh (make local-api does)")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.local_stack",
        description="Serve the whole service locally: Sonos stand-in + local API with seeded settings (Ctrl-C stops).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="0 picks a free port")
    parser.add_argument("--standin-port", type=int, default=DEFAULT_STANDIN_PORT, help="0 picks a free port")
    parser.add_argument("--demo-user", default=DEMO_USER_ID)
    parser.add_argument("--households", type=int, default=2, help="households the stand-in's accounts have")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    stack = LocalStack(
        redis_url=_required_env("REDIS_URL"),
        database_url=_required_env("DATABASE_URL"),
        api_port=args.api_port,
        standin_port=args.standin_port,
        host=args.host,
        standin_config=StandInConfig(households=args.households, log_requests=True),
        demo_user_id=args.demo_user,
    )
    stop_requested = threading.Event()
    # SIGINT explicitly too: a shell starting us in the background leaves it ignored, not KeyboardInterrupt.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, frame: stop_requested.set())
    try:
        stack.start()
    except OSError as exc:
        raise SystemExit(
            f"could not listen ({exc.strerror}): another process uses the port; "
            "pick others with LOCAL_API_PORT / SONOS_STANDIN_PORT"
        ) from None
    try:
        api = stack.api
        print()
        print(f"  Open {api.url}/  and press Connect Sonos (demo user {args.demo_user!r}).")
        print()
        print(f"  Local API      {api.url}   (routes from template.yaml, real handlers in-process)")
        for route in api.service.routes:
            print(f"    {route.method:<6} {api.url}{route.path}   {route.function.logical_id}, auth {route.authorizer}")
        print(f"  Sonos stand-in {stack.stand_in.url}   (consent page, token endpoint, households)")
        print(f"    stats        {stack.stand_in.url}/__admin/stats")
        print(f'    knobs        {stack.stand_in.url}/__admin/config   (POST JSON, e.g. {{"fail_next": 1}})')
        print(f"  Redis          {stack.settings['REDIS_URL']}")
        print(f"  Postgres       {stack.settings['DATABASE_URL']}   (table sonos_tokens)")
        print()
        print("  Try it from a shell (AWS_IAM routes accept local calls unsigned):")
        body = json.dumps({"userId": args.demo_user})
        print(f"    curl -s -X POST {api.url}/sonos/oauth/initiate -H 'Content-Type: application/json' -d '{body}'")
        print(f"    curl -s '{api.url}/sonos/token?userId={args.demo_user}'")
        print(f"    curl -s -X DELETE '{api.url}/sonos/token?userId={args.demo_user}'")
        print()
        print("  Ctrl-C stops everything (the services too).", flush=True)
        stop_requested.wait()
    finally:
        stack.stop()
        print("local stack stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
