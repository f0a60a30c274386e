"""Lambda handler: OAuth initiate. Starts linking a user's Sonos account (direct invoke, POST /sonos/oauth/initiate)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from token_manager import edge, runtime
from token_manager.edge import InitiateRequest
from token_manager.observability import lambda_entry, span

if TYPE_CHECKING:
    # Powertools' resolver is loaded by the first API event only (edge.ApiRoutes).
    from aws_lambda_powertools.event_handler import Response
    from aws_lambda_powertools.event_handler.openapi.params import Body
    from aws_lambda_powertools.utilities.typing import LambdaContext

api = edge.ApiRoutes()


def initiate(request: InitiateRequest) -> dict[str, Any]:
    manager = runtime.get_manager()
    with span("initiate_oauth_flow"):
        authorization = manager.initiate_oauth_flow(request.user_id, request.redirect_uri)
    return edge.initiate_answer(authorization)


@api.post("/sonos/oauth/initiate")
def initiate_over_api(request: Annotated[InitiateRequest, Body()]) -> Response[str]:
    return edge.json_answer(initiate(request))


def initiate_direct(payload: Mapping[str, Any]) -> dict[str, Any]:
    return initiate(InitiateRequest.model_validate(payload))


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return edge.serve(event, context, api=api, direct=initiate_direct)
