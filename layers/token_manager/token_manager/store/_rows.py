"""The one mapping between ``sonos_tokens`` rows and the grant records, shared by both stores."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from token_manager.models import NewGrant, StoredGrant, TokenStatus, TokenUpdate

# Every column a StoredGrant is read from, in table order. Both stores select exactly
# these, so a column added later does not change what the service reads or ships.
GRANT_COLUMNS: tuple[str, ...] = (
    "user_id",
    "household_id",
    "household_ids",
    "access_token_encrypted",
    "refresh_token_encrypted",
    "encryption_key_id",
    "expires_at",
    "scope",
    "token_status",
    "version",
    "refresh_failure_count",
    "last_error_code",
    "last_refreshed_at",
    "created_at",
    "updated_at",
)

# Column values as the stores hand them to their driver: datetimes stay datetimes
# (psycopg adapts them; ``json_ready`` turns them into ISO strings for PostgREST).
Columns = dict[str, Any]


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC. A naive datetime is refused: the table stores instants, and
    guessing a zone for one would silently move a token's expiry by hours."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("datetimes written to the token store must be timezone-aware")
    return moment.astimezone(UTC)


def _read_datetime(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, str):
        # PostgREST renders timestamptz in the database's time zone, e.g. "+00:00".
        return utc(datetime.fromisoformat(value))
    raise TypeError(f"expected a timestamp, got {type(value).__name__}")


def grant_from_row(row: Mapping[str, Any]) -> StoredGrant:
    """A StoredGrant from a psycopg dict row or a PostgREST JSON object."""
    return StoredGrant(
        user_id=str(row["user_id"]),
        household_id=str(row["household_id"]),
        household_ids=tuple(str(household) for household in row["household_ids"]),
        access_token_encrypted=row["access_token_encrypted"],
        refresh_token_encrypted=row["refresh_token_encrypted"],
        encryption_key_id=str(row["encryption_key_id"]),
        expires_at=_read_datetime(row["expires_at"]),
        scope=str(row["scope"]),
        token_status=TokenStatus(row["token_status"]),
        version=int(row["version"]),
        refresh_failure_count=int(row["refresh_failure_count"]),
        last_error_code=row["last_error_code"],
        last_refreshed_at=_read_datetime(row["last_refreshed_at"]),
        created_at=_read_datetime(row["created_at"]),
        updated_at=_read_datetime(row["updated_at"]),
    )


def link_columns(grant: NewGrant) -> Columns:
    """Every writable column of a freshly linked grant. Linking replaces the user's
    previous row whole, so state from the old grant (expired status, failure count,
    last error, refresh time) must be overwritten, not merged."""
    return {
        "user_id": grant.user_id,
        "household_id": grant.household_id,
        "household_ids": list(grant.household_ids),
        "access_token_encrypted": grant.access_token_encrypted,
        "refresh_token_encrypted": grant.refresh_token_encrypted,
        "encryption_key_id": grant.encryption_key_id,
        "expires_at": utc(grant.expires_at),
        "scope": grant.scope,
        "token_status": TokenStatus.ACTIVE.value,
        "refresh_failure_count": 0,
        "last_error_code": None,
        "last_refreshed_at": None if grant.last_refreshed_at is None else utc(grant.last_refreshed_at),
    }


def token_update_columns(update: TokenUpdate) -> Columns:
    """What a successful refresh writes. A missing scope or refresh time keeps the stored
    one (the provider may omit scope); a success always clears the failure streak."""
    columns: Columns = {
        "access_token_encrypted": update.access_token_encrypted,
        "refresh_token_encrypted": update.refresh_token_encrypted,
        "encryption_key_id": update.encryption_key_id,
        "expires_at": utc(update.expires_at),
        "refresh_failure_count": 0,
        "last_error_code": None,
    }
    if update.scope is not None:
        columns["scope"] = update.scope
    if update.last_refreshed_at is not None:
        columns["last_refreshed_at"] = utc(update.last_refreshed_at)
    return columns


def expired_columns(reason: str) -> Columns:
    """A grant the provider no longer honours: no ciphertext is kept for it."""
    return {
        "token_status": TokenStatus.EXPIRED.value,
        "access_token_encrypted": None,
        "refresh_token_encrypted": None,
        "last_error_code": reason,
    }


def reencrypt_columns(
    access_token_encrypted: str | None,
    refresh_token_encrypted: str | None,
    encryption_key_id: str,
) -> Columns:
    return {
        "access_token_encrypted": access_token_encrypted,
        "refresh_token_encrypted": refresh_token_encrypted,
        "encryption_key_id": encryption_key_id,
    }


def json_ready(columns: Columns) -> dict[str, Any]:
    """Column values as PostgREST's JSON body wants them: instants as ISO 8601 UTC."""
    return {name: _json_value(value) for name, value in columns.items()}


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def iso_utc(moment: datetime) -> str:
    """ISO 8601 with a ``Z`` suffix. A ``+00:00`` offset would be risky in a PostgREST
    filter: a ``+`` left unescaped in a query string is read as a space."""
    return utc(moment).isoformat().replace("+00:00", "Z")


def require_positive_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return limit
