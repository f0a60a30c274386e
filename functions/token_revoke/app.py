"""Lambda handler: token revoke. Disconnects a user's Sonos account (direct invoke, DELETE /sonos/token)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from token_manager import edge, runtime
from token_manager.edge import MAX_ID_CHARS, RevokeRequest
from token_manager.observability import lambda_entry, span

if TYPE_CHECKING:
    # Powertools' resolver is loaded by the first API event only (edge.ApiRoutes).
    from aws_lambda_powertools.event_handler import Response
    from aws_lambda_powertools.event_handler.openapi.params import Body, Query
    from aws_lambda_powertools.utilities.typing import LambdaContext

api = edge.ApiRoutes()


def revoke(request: RevokeRequest) -> dict[str, Any]:
    manager = runtime.get_manager()
    with span("revoke_token"):
        result = manager.revoke_token(request.user_id, request.household_id)
    return edge.revoke_answer(result)


@api.delete("/sonos/token")
def revoke_over_api(
    user_id: Annotated[str | None, Query(alias="userId", min_length=1, max_length=MAX_ID_CHARS)] = None,
    household_id: Annotated[str | None, Query(alias="householdId", min_length=1, max_length=MAX_ID_CHARS)] = None,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> Response[str]:
    # The ids come from the query string or a JSON body; the query wins where both have one,
    # but a malformed id is refused wherever it is, not silently outvoted.
    query = {name: value for name, value in (("userId", user_id), ("householdId", household_id)) if value is not None}
    if body:
        RevokeRequest.model_validate({**query, **body})
    return edge.json_answer(revoke(RevokeRequest.model_validate({**(body or {}), **query})))


def revoke_direct(payload: Mapping[str, Any]) -> dict[str, Any]:
    return revoke(RevokeRequest.model_validate(payload))


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return edge.serve(event, context, api=api, direct=revoke_direct)
