"""Fault tests: the real Redis and Postgres (stopped and started here), the Sonos stand-in, the handlers.

Every test runs under the secret guard, and leaves both servers running whatever it did.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.secret_guard import SecretGuard, pytest_runtest_makereport, secret_guard, secret_guard_everywhere
from tests.support.service_control import ServiceControl, ServiceHandles
from tests.support.service_world import ServiceWorld, service_world

__all__ = ["pytest_runtest_makereport", "secret_guard", "secret_guard_everywhere"]


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceControl]:
    control = ServiceControl(ServiceHandles.from_environment())
    control.ensure_running()
    yield control
    control.ensure_running()  # later suites expect both servers where with-services.sh put them


@pytest.fixture(autouse=True)
def _servers_back_after_each_test(services: ServiceControl) -> Iterator[None]:
    yield
    services.ensure_running()


@pytest.fixture
def world(
    monkeypatch: pytest.MonkeyPatch,
    secret_guard: SecretGuard,
    database_url: str,
    redis_url: str,
    services: ServiceControl,
) -> Iterator[ServiceWorld]:
    yield from service_world(
        monkeypatch=monkeypatch, guard=secret_guard, database_url=database_url, redis_url=redis_url
    )
