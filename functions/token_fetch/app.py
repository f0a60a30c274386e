"""Lambda handler: token fetch. A valid Sonos access token for a user (router direct invoke, GET /sonos/token)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from token_manager import edge, runtime
from token_manager.edge import MAX_ID_CHARS, FetchRequest
from token_manager.observability import lambda_entry, record_latency_ms, span

if TYPE_CHECKING:
    # Powertools' resolver is loaded by the first API event only (edge.ApiRoutes).
    from aws_lambda_powertools.event_handler import Response
    from aws_lambda_powertools.event_handler.openapi.params import Query
    from aws_lambda_powertools.utilities.typing import LambdaContext

api = edge.ApiRoutes()


def fetch(request: FetchRequest) -> dict[str, Any]:
    manager = runtime.get_manager()
    started = time.perf_counter()
    with span("get_token"):
        token = manager.get_token(request.user_id, request.household_id)
    record_latency_ms("FetchLatency", (time.perf_counter() - started) * 1000)
    return edge.fetch_answer(token)


@api.get("/sonos/token")
def fetch_over_api(
    user_id: Annotated[str, Query(alias="userId", min_length=1, max_length=MAX_ID_CHARS)],
    household_id: Annotated[str | None, Query(alias="householdId", min_length=1, max_length=MAX_ID_CHARS)] = None,
) -> Response[str]:
    return edge.json_answer(fetch(FetchRequest.model_validate({"userId": user_id, "householdId": household_id})))


def fetch_direct(payload: Mapping[str, Any]) -> dict[str, Any]:
    return fetch(FetchRequest.model_validate(payload))


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return edge.serve(event, context, api=api, direct=fetch_direct)
