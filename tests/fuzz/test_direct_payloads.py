"""Any JSON a router might send as a direct invoke gets the operation's answer or the error
body (DESIGN.md section 3): never a 500, a stack trace, exception text or an echo of the input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from tests.support.answer_checks import check_api_answer, check_direct_answer
from tests.support.fuzz_strategies import FUZZ, INPUT_MARKER, payloads
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration

SUCCESS_KEYS = {
    "oauth_initiate": {"authorizationUrl", "state", "expiresIn"},
    "token_fetch": {"accessToken", "householdId", "householdIds", "expiresAt"},
    "token_revoke": {"revoked", "providerRevoked"},
    "oauth_callback": set(),  # answers API Gateway only
}
FIELDS = {
    "oauth_initiate": ("userId", "redirectUri"),
    "token_fetch": ("userId", "householdId"),
    "token_revoke": ("userId", "householdId"),
    "oauth_callback": ("code", "state", "error"),
}


def check_answer(function: str, answer: Any) -> None:
    if isinstance(answer, dict) and "statusCode" in answer:
        # A payload with httpMethod or requestContext is taken for an API Gateway event.
        check_api_answer(
            answer,
            success_keys=SUCCESS_KEYS[function],
            browser=function == "oauth_callback",
            forbidden=[INPUT_MARKER],
        )
    else:
        check_direct_answer(answer, SUCCESS_KEYS[function], forbidden=[INPUT_MARKER])


@FUZZ
@given(payload=payloads(FIELDS["oauth_initiate"]))
def test_initiate_direct_payloads(world: ServiceWorld, payload: Any) -> None:
    check_answer("oauth_initiate", world.invoke("oauth_initiate", payload))


@FUZZ
@given(payload=payloads(FIELDS["token_fetch"]))
def test_fetch_direct_payloads(world: ServiceWorld, payload: Any) -> None:
    check_answer("token_fetch", world.invoke("token_fetch", payload))


@FUZZ
@given(payload=payloads(FIELDS["token_revoke"]))
def test_revoke_direct_payloads(world: ServiceWorld, payload: Any) -> None:
    check_answer("token_revoke", world.invoke("token_revoke", payload))


@FUZZ
@given(payload=payloads(FIELDS["oauth_callback"]))
def test_callback_direct_payloads_are_refused_as_api_only(world: ServiceWorld, payload: Any) -> None:
    check_answer("oauth_callback", world.invoke("oauth_callback", payload))
