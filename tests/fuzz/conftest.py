"""Fuzz tests: handlers fed bad input on the real Redis and Postgres, under the secret guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.secret_guard import SecretGuard, pytest_runtest_makereport, secret_guard, secret_guard_everywhere
from tests.support.service_world import ServiceWorld, service_world

# A test's examples share one world on purpose: a warm container fed one bad input after another.

__all__ = ["pytest_runtest_makereport", "secret_guard", "secret_guard_everywhere"]


@pytest.fixture
def world(
    monkeypatch: pytest.MonkeyPatch, secret_guard: SecretGuard, database_url: str, redis_url: str
) -> Iterator[ServiceWorld]:
    for world in service_world(
        monkeypatch=monkeypatch, guard=secret_guard, database_url=database_url, redis_url=redis_url
    ):
        world.link()  # one connected user, so some inputs reach a real grant
        yield world
