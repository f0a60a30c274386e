"""How a Sonos call fails (the SonosError family), importable without the HTTP client.

The manager catches these on every path; keeping them apart from ``provider`` (which
imports ``requests``) lets a fetch answered from the cache and a refresher run with
nothing due start without loading the HTTP stack. ``provider`` re-exports them.
"""

from __future__ import annotations

import re
from typing import ClassVar

__all__ = [
    "SonosClientRejected",
    "SonosError",
    "SonosGrantRejected",
    "SonosInvalidResponse",
    "SonosUnavailable",
    "sanitize_error_code",
]

_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")


def sanitize_error_code(raw: object) -> str | None:
    """A provider error code fit for logs and storage (``[a-z0-9_]``, at most 64), else ``None``.

    Apigee-style codes (``steps.oauth.v2.invalid_client``) keep their last segment.
    """
    if not isinstance(raw, str):
        return None
    candidate = raw.strip().rsplit(".", 1)[-1].lower()
    return candidate if _ERROR_CODE.fullmatch(candidate) else None


class SonosError(Exception):
    """A Sonos call failed. Messages name the operation, status and error code, never a token,
    the client secret or a response body."""

    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "The Sonos call failed."

    def __init__(self, message: str | None = None, *, operation: str | None = None, status: int | None = None) -> None:
        self.message = message or self.default_message
        self.operation = operation
        self.status = status
        super().__init__(self.message)


class SonosUnavailable(SonosError):
    """Transient (timeout, connection error, 429, 5xx) and still failing after every attempt.
    The grant is fine; try again later."""

    retryable = True
    default_message = "Sonos is unavailable."


class SonosGrantRejected(SonosError):
    """Sonos refuses this user's grant (or authorization code): the user must connect again."""

    default_message = "Sonos rejected the grant."

    def __init__(
        self,
        error_code: str = "unknown",
        message: str | None = None,
        *,
        operation: str | None = None,
        status: int | None = None,
    ) -> None:
        self.error_code = sanitize_error_code(error_code) or "unknown"
        super().__init__(
            message or f"Sonos rejected the grant ({self.error_code}).", operation=operation, status=status
        )


class SonosClientRejected(SonosError):
    """Sonos refuses our client (wrong id/secret, wrong URL): our configuration, not the user's grant."""

    default_message = "Sonos rejected this service's client configuration."

    def __init__(
        self,
        message: str | None = None,
        *,
        operation: str | None = None,
        status: int | None = None,
        error_code: str | None = None,
    ) -> None:
        self.error_code = sanitize_error_code(error_code)
        super().__init__(message, operation=operation, status=status)


class SonosInvalidResponse(SonosError):
    """Sonos answered 2xx with something we cannot use (no expiry, no token, not JSON, no households list)."""

    default_message = "Sonos answered with an unusable response."
