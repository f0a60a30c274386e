"""The storage contract every grant store honours (tests/integration/test_store_contract.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from token_manager.models import NewGrant, StoredGrant, TokenUpdate

TABLE = "sonos_tokens"


class TokenStore(Protocol):
    """Persistence of Sonos grants.

    Every write that follows a read is conditional on the version read: the database
    gives each write a fresh, never-reused version, so a late writer can never
    overwrite a newer token nor bring back a deleted grant. Failures of the backing
    service raise ``StorageUnavailable``.
    """

    def get(self, user_id: str) -> StoredGrant | None:
        """The user's grant, or None."""

    def link(self, grant: NewGrant) -> StoredGrant:
        """Insert the grant, or replace the user's previous one (status active,
        failure count reset). Returns the stored row with its new version."""

    def update_tokens(self, user_id: str, expected_version: int, update: TokenUpdate) -> StoredGrant | None:
        """Write refreshed tokens if the row still has ``expected_version`` and is active.
        Resets the failure count. Returns the new row, or None when the race was lost."""

    def record_refresh_failure(self, user_id: str, expected_version: int, error_code: str) -> bool:
        """Count a transient refresh failure (grant stays active). False if the row moved."""

    def mark_expired(self, user_id: str, reason: str, expected_version: int | None = None) -> bool:
        """Set status ``expired``, clear both encrypted tokens, record ``reason``.
        Only an active row changes; returns True when this call changed it."""

    def reencrypt(
        self,
        user_id: str,
        expected_version: int,
        access_token_encrypted: str | None,
        refresh_token_encrypted: str | None,
        encryption_key_id: str,
    ) -> bool:
        """Replace ciphertexts and key id (key rotation) if the version still matches."""

    def delete(self, user_id: str) -> bool:
        """Remove the grant. True if a row was deleted."""

    def list_due(self, before: datetime, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        """Active grants with ``expires_at < before``, ordered by user id, keyset-paged."""

    def list_not_under_key(self, key_id: str, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        """Rows whose ``encryption_key_id`` differs from ``key_id``, ordered by user id."""

    def count_by_key_id(self) -> dict[str, int]:
        """Number of rows per ``encryption_key_id``."""
