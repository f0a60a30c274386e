"""The scheduled functions fed junk events: any JSON object starts a run and gets its report,
anything else is invalid_request; never a 500, a trace or an exception text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from hypothesis import given, settings
from moto import mock_aws

from tests.support.answer_checks import REFRESHER_SUMMARY_KEYS, check_direct_answer, refresher_summary
from tests.support.fuzz_strategies import FUZZ, INPUT_MARKER, json_values, payloads
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration

REFRESHER_KEYS = set(REFRESHER_SUMMARY_KEYS)
ROTATION_KEYS = {
    "activeKeyId",
    "previousKeyId",
    "scanned",
    "reencrypted",
    "lostRaces",
    "failed",
    "retiredKeyIds",
    "keysInUse",
}
KEY_RING_PARAMETER = "/storytailor-dev/sonos/token-encryption-keys"
scheduler_events = payloads(("source", "detail-type", "time", "detail", "scheduledTime")) | json_values


@FUZZ
@given(event=scheduler_events)
def test_refresher_junk_events(world: ServiceWorld, event: Any) -> None:
    answer = world.invoke("token_refresher", event)
    check_direct_answer(answer, REFRESHER_KEYS, forbidden=[INPUT_MARKER])
    if isinstance(event, dict):
        assert answer == refresher_summary()


@pytest.fixture
def ring_in_ssm(world: ServiceWorld) -> Iterator[Any]:
    """The key ring where rotation needs it: SSM (moto), not the environment."""
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-east-1")
        ssm.put_parameter(Name=KEY_RING_PARAMETER, Value=world.ring.to_json(), Type="SecureString")
        world.monkeypatch.setenv("TOKEN_ENCRYPTION_KEYS", "")
        world.new_container()
        yield ssm


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 25))
@given(event=scheduler_events)
def test_key_rotation_junk_events(world: ServiceWorld, ring_in_ssm: Any, event: Any) -> None:
    answer = world.invoke("key_rotation", event)
    ring = ring_in_ssm.get_parameter(Name=KEY_RING_PARAMETER, WithDecryption=True)["Parameter"]["Value"]
    world.guard.add_key_ring(ring)
    check_direct_answer(answer, ROTATION_KEYS, forbidden=[INPUT_MARKER])
    if isinstance(event, dict):
        assert (answer["reencrypted"], answer["failed"]) == (1, 0)
        assert "accessToken" in world.fetch()  # the rotated row still reads
