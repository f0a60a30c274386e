"""Records shared by the store, the manager and the handlers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

# The rule for user and household ids wherever they arrive (request models, the manager,
# docs/openapi.yaml's Id): 1 to 256 characters of printable ASCII, no spaces.
MAX_ID_CHARS: Final = 256
ID_PATTERN: Final = r"^[!-~]+$"


class TokenStatus(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """One row of ``sonos_tokens``. Token fields hold ciphertext, never plaintext."""

    user_id: str
    household_id: str
    household_ids: tuple[str, ...]
    access_token_encrypted: str | None
    refresh_token_encrypted: str | None
    encryption_key_id: str
    expires_at: datetime | None
    scope: str
    token_status: TokenStatus
    version: int
    refresh_failure_count: int = 0
    last_error_code: str | None = None
    last_refreshed_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewGrant:
    """What linking writes: inserted, or replacing the user's previous grant."""

    user_id: str
    household_id: str
    household_ids: tuple[str, ...]
    access_token_encrypted: str
    refresh_token_encrypted: str
    encryption_key_id: str
    expires_at: datetime
    scope: str
    last_refreshed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """What a refresh writes, conditional on the version read."""

    access_token_encrypted: str
    refresh_token_encrypted: str
    encryption_key_id: str
    expires_at: datetime
    scope: str | None = None
    last_refreshed_at: datetime | None = None
