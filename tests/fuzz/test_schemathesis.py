"""Schemathesis against docs/openapi.yaml on the local API server: the template's routes served
by the real handlers in-process, with the Sonos stand-in and the live Redis and Postgres.

Bounded (25 examples per operation, SCHEMATHESIS_MAX_EXAMPLES=500 digs deeper) so it stays
a few seconds. Needs schemathesis from requirements-dev.txt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml  # type: ignore[import-untyped,unused-ignore]
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from devtools.local_stack import LocalStack
from token_manager import runtime

pytestmark = pytest.mark.integration

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
EXAMPLES_PER_OPERATION = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
# A well-formed request may still be refused for what it names (an OAuth state nobody
# issued, an unregistered redirect URI): "schema-valid means accepted" cannot hold here.
NOT_APPLICABLE = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def local_stack(redis_url: str, database_url: str) -> Iterator[LocalStack]:
    runtime.reset_for_tests()  # the handlers wire themselves from the settings the stack seeds
    with LocalStack(redis_url=redis_url, database_url=database_url, api_log=lambda line: None) as stack:
        yield stack
    runtime.reset_for_tests()


def _behind_the_gateway(document: dict[str, Any]) -> dict[str, Any]:
    """The document as the functions see it: API Gateway checked SigV4 before they run, and
    the local API accepts every call as signed, so the security requirements are dropped
    (tests/fuzz/test_openapi.py holds them to the template)."""
    for item in document["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
    document["components"].pop("securitySchemes", None)
    return document


# Loaded at import (schemathesis's lazy from_fixture loader reads a pytest internal that
# pytest 9 no longer has); the server's URL is given with each call instead.
schema = schemathesis.openapi.from_dict(
    _behind_the_gateway(yaml.safe_load(OPENAPI.read_text())),
    # Undeclared methods never reach a function in AWS (API Gateway answers them itself), and
    # the local server's answer to one is http.server's, not the service's.
    config=SchemathesisConfig.from_dict({"phases": {"coverage": {"unexpected-methods": []}}}),
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_local_api_answers_as_documented(case: Any, local_stack: LocalStack) -> None:
    case.call_and_validate(base_url=local_stack.api.url, excluded_checks=NOT_APPLICABLE)
