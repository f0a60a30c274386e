"""The service's one error taxonomy (DESIGN.md section 3), mapped to HTTP here only."""

from __future__ import annotations

from typing import Any, ClassVar


class TokenServiceError(Exception):
    """An error a caller may see. ``message`` must never carry a secret."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "Internal error."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def to_body(self) -> dict[str, Any]:
        """The API body: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def to_direct_body(self) -> dict[str, Any]:
        """The direct-invoke body: the API body plus ``status`` inside ``error``."""
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class InvalidRequest(TokenServiceError):
    code = "invalid_request"
    status = 400
    default_message = "The request is malformed."


class InvalidRedirectUri(TokenServiceError):
    code = "invalid_redirect_uri"
    status = 400
    default_message = "The redirect URI is not registered for this service."


class InvalidState(TokenServiceError):
    code = "invalid_state"
    status = 400
    default_message = "The authorization link is unknown, expired or already used. Start again."


class AccessDenied(TokenServiceError):
    code = "access_denied"
    status = 400
    default_message = "The Sonos account owner denied access."


class NotConnected(TokenServiceError):
    code = "not_connected"
    status = 404
    default_message = "No Sonos account is connected for this user."


class HouseholdNotLinked(TokenServiceError):
    code = "household_not_linked"
    status = 404
    default_message = "The household is not part of this user's Sonos grant."


class ReconnectRequired(TokenServiceError):
    code = "reconnect_required"
    status = 409
    default_message = "Sonos no longer accepts this grant; the user must connect Sonos again."


class UpstreamUnavailable(TokenServiceError):
    code = "upstream_unavailable"
    status = 503
    retryable = True
    default_message = "Sonos is unavailable; try again later."


class CodeExchangeUnavailable(UpstreamUnavailable):
    """Sonos did not answer the code exchange; the state was put back, so the same callback can be retried."""

    default_message = "Sonos did not answer in time; reload this page in a moment to finish connecting."


class StorageUnavailable(TokenServiceError):
    code = "storage_unavailable"
    status = 503
    retryable = True
    default_message = "Token storage is unavailable; try again later."


class ConfigurationError(TokenServiceError):
    code = "configuration_error"
    status = 500
    default_message = "The token service is misconfigured."


ALL_ERRORS: tuple[type[TokenServiceError], ...] = (
    InvalidRequest,
    InvalidRedirectUri,
    InvalidState,
    AccessDenied,
    NotConnected,
    HouseholdNotLinked,
    ReconnectRequired,
    UpstreamUnavailable,
    StorageUnavailable,
    ConfigurationError,
)


class TokenDecryptionError(Exception):
    """A ciphertext could not be authenticated: wrong key, unknown key id, tampering,
    or a value copied to another user or field. Never carries data or key material."""


class KeyRingError(ValueError):
    """The key ring setting is unusable. The message names the problem, never a key."""
