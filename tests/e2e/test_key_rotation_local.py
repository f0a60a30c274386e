"""Key rotation through the real handlers with the key ring in (local moto) SSM, as deployed."""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
import requests

from devtools.local_stack import LocalStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning"),
]


@pytest.fixture
def stack(redis_url: str, migrated_database: str) -> Iterator[LocalStack]:
    from token_manager import runtime

    runtime.reset_for_tests()  # a fresh container: settings, ring and Powertools' SSM cache
    # The handlers' JSON logs would otherwise fill the captured output of every test.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        LocalStack(
            redis_url=redis_url, database_url=migrated_database, local_ssm=True, api_log=lambda line: None
        ) as local,
    ):
        yield local
    runtime.reset_for_tests()


def _link(stack: LocalStack, user_id: str) -> None:
    started = requests.post(stack.api.url + "/sonos/oauth/initiate", json={"userId": user_id}, timeout=10)
    assert started.status_code == 200, started.text
    callback = urlsplit(stack.stand_in.approve(started.json()["authorizationUrl"]))
    linked = requests.get(f"{stack.api.url}{callback.path}?{callback.query}", timeout=10)
    assert linked.status_code == 200, linked.text


def test_second_rotation_in_a_warm_container_keeps_the_key_of_the_first(stack: LocalStack) -> None:
    first = stack.api.runner.invoke("KeyRotationFunction", {})
    second = stack.api.runner.invoke("KeyRotationFunction", {})
    ring = json.loads(stack.current_key_ring_json())

    # Rows the first rotation re-encrypted are under its key: dropping it would lose them for good.
    assert second["previousKeyId"] == first["activeKeyId"]
    assert first["activeKeyId"] in ring["keys"]
    assert ring["active"] == second["activeKeyId"]


def test_warm_fetch_container_reads_a_row_rotated_by_another_container(stack: LocalStack) -> None:
    user_id = f"rotation-user-{uuid.uuid4().hex[:10]}"
    _link(stack, user_id)
    before = requests.get(stack.api.url + "/sonos/token", params={"userId": user_id}, timeout=10)
    assert before.status_code == 200, before.text  # the fetch container is warm, its ring loaded

    rotated = stack.api.runner.invoke("KeyRotationFunction", {})
    # The Redis copy outlives a rotation (it is sealed with the cache key of its time); read the row.
    redis.Redis.from_url(stack.settings["REDIS_URL"]).delete(f"sonos:token:{user_id}")
    after = requests.get(stack.api.url + "/sonos/token", params={"userId": user_id}, timeout=10)

    assert rotated["reencrypted"] == 1
    assert after.status_code == 200, after.text
    assert after.json()["accessToken"] == before.json()["accessToken"]
