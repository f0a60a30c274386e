"""Lambda handler: OAuth callback. Sonos redirects the user's browser here (GET /sonos/oauth/callback)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from token_manager import edge, link_pages, runtime
from token_manager.errors import TokenServiceError
from token_manager.link_pages import LinkUrls
from token_manager.observability import lambda_entry, span

if TYPE_CHECKING:
    # Powertools' resolver is loaded by the first API event only (edge.ApiRoutes).
    from aws_lambda_powertools.event_handler import Response
    from aws_lambda_powertools.event_handler.openapi.params import Query
    from aws_lambda_powertools.utilities.typing import LambdaContext


def link_urls() -> LinkUrls:
    """The configured success/failure URLs; without settings, the browser gets a page."""
    try:
        settings = runtime.get_settings()
    except TokenServiceError:
        return LinkUrls()
    return LinkUrls(success=settings.link_success_url, failure=settings.link_failure_url)


def refuse_in_browser(error: TokenServiceError) -> Response[str]:
    return link_pages.link_failed(error, link_urls())


api = edge.ApiRoutes(refuse=refuse_in_browser)


@api.get("/sonos/oauth/callback")
def callback(
    code: Annotated[str | None, Query()] = None,
    state: Annotated[str | None, Query()] = None,
    error: Annotated[str | None, Query()] = None,
) -> Response[str]:
    # The manager checks each value (lengths, state format) and answers a repeated
    # callback like the first one; the query itself is never logged: it holds the code.
    urls = link_urls()
    manager = runtime.get_manager()
    with span("handle_oauth_callback"):
        manager.handle_oauth_callback(code, state, error)
    return link_pages.link_succeeded(urls)


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return edge.serve(event, context, api=api)
