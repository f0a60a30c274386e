"""Key rotation: add a new active key, re-encrypt rows under older keys, retire unused keys."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, auto

from token_manager.crypto import FIELD_ACCESS_TOKEN, FIELD_REFRESH_TOKEN, KeyRing, TokenCipher, new_key_id
from token_manager.errors import KeyRingError, TokenDecryptionError
from token_manager.models import StoredGrant
from token_manager.store.base import TokenStore

__all__ = [
    "ReencryptReport",
    "RetireReport",
    "reencrypt_rows",
    "retire_key",
    "retire_unused_keys",
    "rotate",
]

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100


def rotate(ring: KeyRing, now: datetime | None = None) -> KeyRing:
    """The ring plus a fresh key, made active. The caller persists it before any re-encryption,
    so no value is ever written under a key that is not stored."""
    return ring.with_new_active_key(new_key_id(now))


@dataclass(frozen=True)
class ReencryptReport:
    scanned: int
    reencrypted: int
    lost_races: int
    failed: int
    pages: int


def reencrypt_rows(store: TokenStore, cipher: TokenCipher, *, page_size: int = DEFAULT_PAGE_SIZE) -> ReencryptReport:
    """Move every row not under the active key to it, one page at a time.

    Each write is conditional on the version read, so a refresh that lands meanwhile wins;
    that row is counted in ``lost_races`` and left for the next pass. A row that does not
    decrypt is counted in ``failed``, logged by user id and key id only, and skipped.
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    active_key_id = cipher.active_key_id
    scanned = reencrypted = lost_races = failed = pages = 0
    after_user_id: str | None = None
    while True:
        page = store.list_not_under_key(active_key_id, page_size, after_user_id)
        if not page:
            break
        pages += 1
        page_reencrypted = page_lost = page_failed = 0
        for row in page:
            outcome = _reencrypt_row(store, cipher, row)
            if outcome is _Outcome.REENCRYPTED:
                page_reencrypted += 1
            elif outcome is _Outcome.LOST_RACE:
                page_lost += 1
            else:
                page_failed += 1
        scanned += len(page)
        reencrypted += page_reencrypted
        lost_races += page_lost
        failed += page_failed
        logger.info(
            "key rotation: page %d re-encrypted %d of %d rows (%d lost races, %d failed)",
            pages,
            page_reencrypted,
            len(page),
            page_lost,
            page_failed,
            extra={
                "rotation_page": pages,
                "rotation_page_rows": len(page),
                "rotation_page_reencrypted": page_reencrypted,
                "rotation_page_lost_races": page_lost,
                "rotation_page_failed": page_failed,
            },
        )
        # Keyset paging on user id: rows that lost a race are not seen again in this pass.
        after_user_id = page[-1].user_id
        if len(page) < page_size:
            break
    report = ReencryptReport(
        scanned=scanned, reencrypted=reencrypted, lost_races=lost_races, failed=failed, pages=pages
    )
    logger.info(
        "key rotation: scanned %d rows in %d pages; %d re-encrypted, %d lost races, %d failed",
        scanned,
        pages,
        reencrypted,
        lost_races,
        failed,
        extra={"rotation_active_key_id": active_key_id},
    )
    return report


class _Outcome(Enum):
    REENCRYPTED = auto()
    LOST_RACE = auto()
    FAILED = auto()


def _reencrypt_row(store: TokenStore, cipher: TokenCipher, row: StoredGrant) -> _Outcome:
    try:
        access = _reseal(cipher, row, row.access_token_encrypted, FIELD_ACCESS_TOKEN)
        refresh = _reseal(cipher, row, row.refresh_token_encrypted, FIELD_REFRESH_TOKEN)
    except TokenDecryptionError:
        # Identifiers only: the error names no value, and neither may the log.
        logger.warning(
            "key rotation: row for user %s under key %s does not decrypt; left as it is",
            row.user_id,
            row.encryption_key_id,
            extra={"user_id": row.user_id, "encryption_key_id": row.encryption_key_id},
        )
        return _Outcome.FAILED
    # Rows with no tokens (expired grants) only move their key id.
    if store.reencrypt(row.user_id, row.version, access, refresh, cipher.active_key_id):
        return _Outcome.REENCRYPTED
    return _Outcome.LOST_RACE


def _reseal(cipher: TokenCipher, row: StoredGrant, ciphertext: str | None, field: str) -> str | None:
    if ciphertext is None:
        return None
    plaintext = cipher.decrypt(ciphertext, key_id=row.encryption_key_id, user_id=row.user_id, field=field)
    return cipher.encrypt(plaintext, user_id=row.user_id, field=field)


@dataclass(frozen=True)
class RetireReport:
    ring: KeyRing
    retired: tuple[str, ...]
    kept_in_use: tuple[str, ...]


def retire_unused_keys(store: TokenStore, ring: KeyRing, *, keep: Iterable[str] = ()) -> RetireReport:
    """Drop every key no row uses, except the active key and those in ``keep``.

    Pass in ``keep`` the previous active key until every container has reloaded the ring:
    a container still holding the old ring encrypts new values under it.
    The caller persists ``report.ring``.
    """
    kept = set(keep)
    rows_per_key = store.count_by_key_id()
    candidates = sorted(key_id for key_id in ring.keys if key_id != ring.active_key_id and key_id not in kept)
    kept_in_use = tuple(key_id for key_id in candidates if rows_per_key.get(key_id, 0) > 0)
    retired = tuple(key_id for key_id in candidates if rows_per_key.get(key_id, 0) == 0)
    new_ring = ring.without_keys(retired)
    logger.info(
        "key rotation: retired %d keys %s; %d older keys still in use %s",
        len(retired),
        list(retired),
        len(kept_in_use),
        list(kept_in_use),
        extra={"rotation_retired_key_ids": list(retired), "rotation_kept_in_use_key_ids": list(kept_in_use)},
    )
    return RetireReport(ring=new_ring, retired=retired, kept_in_use=kept_in_use)


def retire_key(store: TokenStore, ring: KeyRing, key_id: str) -> KeyRing:
    """The ring without ``key_id``; KeyRingError if it is active, unknown, or any row still uses it."""
    if key_id == ring.active_key_id:
        raise KeyRingError(f"refusing to retire the active key {key_id!r}")
    if key_id not in ring.keys:
        raise KeyRingError("cannot retire a key the ring does not hold")
    rows = store.count_by_key_id().get(key_id, 0)
    if rows:
        raise KeyRingError(f"key {key_id!r} still encrypts {rows} rows; re-encrypt them before retiring it")
    logger.info("key rotation: retired key %s", key_id, extra={"rotation_retired_key_ids": [key_id]})
    return ring.without_keys([key_id])
