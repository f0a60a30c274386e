"""Configuration faults: SSM unreachable at cold start, and a stored row under a key the ring lacks.

Both are configuration_error (500) for the caller, touch no row, and clear up without a
new container once the configuration is right again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.support.service_world import (
    ServiceWorld,
    assert_api_error,
    assert_direct_error,
    assert_grant_unchanged,
)
from token_manager.crypto import KeyRing

pytestmark = pytest.mark.integration

SSM_PREFIX = "/storytailor-dev/"
# Settings that come from SSM in these tests: environment variable -> parameter name.
FROM_SSM = {
    "SONOS_CLIENT_SECRET": "sonos/client-secret",
    "TOKEN_ENCRYPTION_KEYS": "sonos/token-encryption-keys",
    "REDIS_URL": "redis/url",
}


class LocalSsm:
    """moto's SSM server on a fixed loopback port, stoppable and startable (state kept in-process)."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):  # it announces itself on stdout
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def ssm(world: ServiceWorld) -> Iterator[LocalSsm]:
    server = LocalSsm()
    server.start()
    for name, value in {
        "AWS_ENDPOINT_URL_SSM": server.url,
        # One attempt: botocore's retries of a refused connection would sleep for real.
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        world.monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.stop()


def _move_settings_to_ssm(world: ServiceWorld, ssm: LocalSsm) -> None:
    import os

    client = boto3.client("ssm", endpoint_url=ssm.url, region_name="us-east-1")
    for variable, parameter in FROM_SSM.items():
        client.put_parameter(
            Name=SSM_PREFIX + parameter, Value=os.environ[variable], Type="SecureString", Overwrite=True
        )
        world.monkeypatch.setenv(variable, "")
    world.new_container()


def test_ssm_unreachable_at_cold_start_is_configuration_error_then_the_same_container_recovers(
    world: ServiceWorld, ssm: LocalSsm
) -> None:
    _move_settings_to_ssm(world, ssm)
    linked = world.link()  # settings read from SSM
    before = world.rows()
    world.new_container()
    ssm.stop()

    down = world.fetch()
    assert_direct_error(down, "configuration_error")
    assert down["error"]["message"] == "Could not read settings from SSM (EndpointConnectionError)."
    assert_api_error(world.fetch_api(), "configuration_error")
    assert_direct_error(world.initiate(), "configuration_error")

    ssm.start()
    assert world.fetch()["accessToken"] == linked.access_token  # the same container, no restart
    assert_grant_unchanged(before, world.rows())


def test_a_key_id_missing_from_the_ring_is_configuration_error_and_the_row_is_untouched(world: ServiceWorld) -> None:
    linked = world.link()
    world.expire_in(60)  # due, so the refresher would want it too
    before = world.rows()
    stranger = KeyRing.generate()  # a ring without the key the row is under
    world.guard.add_key_ring(stranger.to_json())
    world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", stranger.to_json())
    world.new_container()

    direct = world.fetch()
    assert_direct_error(direct, "configuration_error")
    assert direct["error"]["message"] == "A stored token cannot be decrypted with the configured key ring."
    assert_api_error(world.fetch_api(), "configuration_error")
    summary = world.invoke("token_refresher", {"source": "aws.scheduler"})
    assert summary["refreshed"] == 0
    # Ours to fix, not the user's: neither a transient failure nor a grant to reconnect.
    assert (summary["failedConfiguration"], summary["failedTransient"], summary["failedPermanent"]) == (1, 0, 0)

    assert world.stand_in.counts()["token_refresh"] == 0  # no refresh token could be read to send
    assert_grant_unchanged(before, world.rows())  # not expired, not cleared: it is our key that is missing
    world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", world.ring.to_json())
    answer = world.fetch()  # the same container re-reads the ring on the unknown key id
    assert "accessToken" in answer
    assert answer["accessToken"] != linked.access_token  # and the due refresh happens now
