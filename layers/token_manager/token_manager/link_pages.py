"""What the user's browser sees after the Sonos consent page: a redirect or a small page.

With ``SONOS_LINK_SUCCESS_URL`` / ``SONOS_LINK_FAILURE_URL`` set, the callback answers
302 to them (the failure URL with ``?error=<code>`` appended, nothing else). Without
them it answers a self-contained HTML page. Either way: no token, no authorization
code, no caching, no referrer (the callback URL carries the code), and a CSP that lets
the page load nothing at all but its own inline style.
"""

from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from token_manager.errors import (
    AccessDenied,
    CodeExchangeUnavailable,
    HouseholdNotLinked,
    InvalidState,
    TokenServiceError,
)

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler import Response

__all__ = ["LinkUrls", "link_failed", "link_succeeded"]

_STYLE: Final = (
    "body{font-family:system-ui,-apple-system,sans-serif;margin:0;background:#f6f6f4;color:#1d1d1b}"
    "main{max-width:28rem;margin:18vh auto;padding:2rem;background:#fff;border-radius:12px;"
    "box-shadow:0 1px 4px rgba(0,0,0,.08)}h1{font-size:1.35rem;margin:0 0 .75rem}p{line-height:1.5;margin:0}"
)
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY: Final = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_PAGE_HEADERS: Final = {
    **_COMMON_HEADERS,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class LinkUrls:
    """Where to send the browser; empty strings mean "show a page instead"."""

    success: str = ""
    failure: str = ""


@dataclass(frozen=True)
class _Page:
    title: str
    text: str


_LINKED = _Page("Sonos is connected", "Your Sonos account is linked. You can close this window.")
_DENIED = _Page("Sonos was not connected", "Access to your Sonos account was not allowed. You can close this window.")
_EXPIRED = _Page(
    "This link has expired",
    "This Sonos connection link is no longer valid. Start connecting Sonos again from the app.",
)
_RETRY = _Page(
    "Sonos did not answer",
    "Sonos did not answer in time. Reload this page in a moment to finish connecting.",
)
_NO_HOUSEHOLD = _Page(
    "No Sonos system found",
    "This Sonos account has no household yet. Set up your Sonos system, then connect Sonos again from the app.",
)
_FAILED = _Page("Sonos could not be connected", "Something went wrong while connecting Sonos. Please try again later.")


def link_succeeded(urls: LinkUrls) -> Response[str]:
    if urls.success:
        return _redirect(urls.success)
    return _page(_LINKED, status=200)


def link_failed(error: TokenServiceError, urls: LinkUrls) -> Response[str]:
    if urls.failure:
        return _redirect(_with_error_code(urls.failure, error.code))
    if isinstance(error, AccessDenied):
        page = _DENIED
    elif isinstance(error, InvalidState):
        page = _EXPIRED
    elif isinstance(error, CodeExchangeUnavailable):
        page = _RETRY
    elif isinstance(error, HouseholdNotLinked):
        page = _NO_HOUSEHOLD
    else:
        page = _FAILED
    return _page(page, status=error.status)


def _redirect(location: str) -> Response[str]:
    from aws_lambda_powertools.event_handler import Response  # loaded with the resolver, on API events only

    return Response(status_code=302, body="", headers={**_COMMON_HEADERS, "Location": location})


def _with_error_code(url: str, code: str) -> str:
    # Codes are the taxonomy's own ([a-z_]), so nothing needs escaping; any query the
    # configured URL already has is kept as it is.
    parts = urlsplit(url)
    query = f"{parts.query}&error={code}" if parts.query else f"error={code}"
    return urlunsplit(parts._replace(query=query))


def _page(page: _Page, *, status: int) -> Response[str]:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(page.title)}</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>{html.escape(page.title)}</h1><p>{html.escape(page.text)}</p></main></body></html>"
    )
    from aws_lambda_powertools.event_handler import Response  # loaded with the resolver, on API events only

    return Response(
        status_code=status,
        content_type="text/html; charset=utf-8",
        body=document,
        headers=dict(_PAGE_HEADERS),
    )
