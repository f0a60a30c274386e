"""The scheduled key rotation: new active key, re-encrypt every row, retire unused keys."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from token_manager.crypto import KeyRing, TokenCipher
from token_manager.rotation import reencrypt_rows, retire_unused_keys, rotate
from token_manager.store.base import TokenStore

logger = logging.getLogger(__name__)


def run_key_rotation(store: TokenStore, ring: KeyRing, *, persist_ring: Callable[[KeyRing], None]) -> dict[str, Any]:
    """Rotate the ring and re-encrypt stored grants under the new key.

    Order matters:

    1. the new ring is persisted before any row uses its key, so a container that
       meets an unknown key id can always load it;
    2. rows are re-encrypted page by page, each write conditional on the row's version;
    3. keys no row uses are retired, except the key that was active until now:
       containers that loaded the ring before this run keep encrypting under it until
       their cached settings expire, so it waits for the next rotation.
    """
    previous_active = ring.active_key_id
    rotated = rotate(ring)
    persist_ring(rotated)
    logger.info("key ring rotated", extra={"previous_key_id": previous_active, "key_id": rotated.active_key_id})
    report = reencrypt_rows(store, TokenCipher(rotated))
    retired = retire_unused_keys(store, rotated, keep=[previous_active])
    if retired.retired:
        persist_ring(retired.ring)
    return {
        "activeKeyId": rotated.active_key_id,
        "previousKeyId": previous_active,
        "scanned": report.scanned,
        "reencrypted": report.reencrypted,
        "lostRaces": report.lost_races,
        "failed": report.failed,
        "retiredKeyIds": list(retired.retired),
        "keysInUse": list(retired.kept_in_use),
    }
