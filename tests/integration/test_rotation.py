"""Key rotation on the real Postgres: re-encryption in pages, lost races, key retirement, quiet logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest

from token_manager.crypto import KeyRing, TokenCipher
from token_manager.errors import KeyRingError
from token_manager.models import NewGrant, StoredGrant, TokenStatus, TokenUpdate
from token_manager.rotation import ReencryptReport, reencrypt_rows, retire_key, retire_unused_keys, rotate
from token_manager.store.postgres import PostgresTokenStore

pytestmark = pytest.mark.integration

OLDER_KEY = bytes(range(32))
OLD_KEY = bytes(range(40, 72))
EXPIRES_AT = datetime(2030, 1, 1, tzinfo=UTC)
TOKEN_TAG = "tk7Q-"


@dataclass(frozen=True)
class Seeded:
    user_id: str
    access_token: str
    refresh_token: str


@pytest.fixture
def clean_table(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("truncate sonos_tokens")


@pytest.fixture
def store(database_url: str, clean_table: None) -> Iterator[PostgresTokenStore]:
    store = PostgresTokenStore(database_url)
    yield store
    store.close()


@pytest.fixture
def old_ring() -> KeyRing:
    """Two generations of keys, ``k-old`` active: rows may sit under either."""
    return KeyRing("k-old", {"k-older": OLDER_KEY, "k-old": OLD_KEY})


def seed(store: PostgresTokenStore, cipher: TokenCipher, count: int, *, prefix: str = "user") -> list[Seeded]:
    seeded = []
    for number in range(count):
        user_id = f"{prefix}-{number:02d}"
        # Distinctive plaintexts, starting with a rare tag, so even a logged prefix shows.
        row = Seeded(user_id, f"{TOKEN_TAG}PLAINTEXT-access-{user_id}", f"{TOKEN_TAG}PLAINTEXT-refresh-{user_id}")
        store.link(
            NewGrant(
                user_id=user_id,
                household_id="Sonos_HH1",
                household_ids=("Sonos_HH1",),
                access_token_encrypted=cipher.encrypt(row.access_token, user_id=user_id, field="access_token"),
                refresh_token_encrypted=cipher.encrypt(row.refresh_token, user_id=user_id, field="refresh_token"),
                encryption_key_id=cipher.active_key_id,
                expires_at=EXPIRES_AT,
                scope="playback-control-all",
            )
        )
        seeded.append(row)
    return seeded


def stored(store: PostgresTokenStore, user_id: str) -> StoredGrant:
    row = store.get(user_id)
    assert row is not None
    return row


def decrypted(cipher: TokenCipher, row: StoredGrant) -> tuple[str, str]:
    assert row.access_token_encrypted is not None
    assert row.refresh_token_encrypted is not None
    key_id, user_id = row.encryption_key_id, row.user_id
    return (
        cipher.decrypt(row.access_token_encrypted, key_id=key_id, user_id=user_id, field="access_token"),
        cipher.decrypt(row.refresh_token_encrypted, key_id=key_id, user_id=user_id, field="refresh_token"),
    )


def rotation_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "token_manager.rotation"]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record's rendered message plus all its attributes (args, extras), as text."""
    return "\n".join(f"{record.getMessage()} {record.__dict__!r}" for record in caplog.records)


# --- rotate -------------------------------------------------------------------------------


def test_rotate_adds_a_fresh_active_key_named_for_the_time_and_keeps_the_old_ones(old_ring: KeyRing) -> None:
    rotated = rotate(old_ring, now=datetime(2026, 12, 3, 18, 30, tzinfo=UTC))
    assert rotated.active_key_id.startswith("k20261203T183000Z-")
    assert set(rotated.keys) == {"k-older", "k-old", rotated.active_key_id}
    assert rotated.keys["k-old"] == OLD_KEY
    assert rotated.keys[rotated.active_key_id] not in (OLD_KEY, OLDER_KEY)
    assert KeyRing.from_json(rotated.to_json()) == rotated


# --- reencrypt_rows -----------------------------------------------------------------------


def test_reencrypt_moves_every_row_across_pages_and_keeps_the_plaintext(
    store: PostgresTokenStore, old_ring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    older_rows = seed(store, TokenCipher(KeyRing("k-older", old_ring.keys)), 4, prefix="early")
    old_rows = seed(store, TokenCipher(old_ring), 6, prefix="later")
    before = {row.user_id: stored(store, row.user_id) for row in older_rows + old_rows}
    new_cipher = TokenCipher(rotate(old_ring))
    caplog.set_level(logging.INFO, logger="token_manager.rotation")

    report = reencrypt_rows(store, new_cipher, page_size=3)

    assert report == ReencryptReport(scanned=10, reencrypted=10, lost_races=0, failed=0, pages=4)
    assert store.count_by_key_id() == {new_cipher.active_key_id: 10}
    for row in older_rows + old_rows:
        after = stored(store, row.user_id)
        assert after.encryption_key_id == new_cipher.active_key_id
        assert after.access_token_encrypted != before[row.user_id].access_token_encrypted
        assert decrypted(new_cipher, after) == (row.access_token, row.refresh_token)
        assert after.version != before[row.user_id].version
        # Rotation changes ciphertexts only: nothing else about the grant moves.
        assert (after.token_status, after.expires_at, after.scope) == (
            TokenStatus.ACTIVE,
            EXPIRES_AT,
            "playback-control-all",
        )
    page_lines = [record for record in rotation_records(caplog) if hasattr(record, "rotation_page")]
    assert [record.rotation_page for record in page_lines] == [1, 2, 3, 4]
    assert [record.rotation_page_rows for record in page_lines] == [3, 3, 3, 1]  # type: ignore[attr-defined]


def test_a_second_pass_finds_nothing_to_do(store: PostgresTokenStore, old_ring: KeyRing) -> None:
    seed(store, TokenCipher(old_ring), 5)
    new_cipher = TokenCipher(rotate(old_ring))
    assert reencrypt_rows(store, new_cipher, page_size=3).reencrypted == 5
    assert reencrypt_rows(store, new_cipher, page_size=3) == ReencryptReport(0, 0, 0, 0, 0)


def test_expired_rows_without_tokens_only_move_their_key_id(store: PostgresTokenStore, old_ring: KeyRing) -> None:
    seed(store, TokenCipher(old_ring), 3)
    assert store.mark_expired("user-01", "invalid_grant")
    new_cipher = TokenCipher(rotate(old_ring))

    report = reencrypt_rows(store, new_cipher, page_size=3)

    assert (report.scanned, report.reencrypted, report.failed) == (3, 3, 0)
    expired = stored(store, "user-01")
    assert expired.encryption_key_id == new_cipher.active_key_id
    assert expired.token_status is TokenStatus.EXPIRED
    assert (expired.access_token_encrypted, expired.refresh_token_encrypted) == (None, None)


class StoreWithConcurrentRefresh(PostgresTokenStore):
    """Before the pass re-encrypts ``raced_user_id``, another container refreshes that
    row, still holding the old ring: its write lands first and moves the version."""

    def __init__(self, dsn: str, raced_user_id: str, old_cipher: TokenCipher) -> None:
        super().__init__(dsn)
        self.raced_user_id = raced_user_id
        self.old_cipher = old_cipher
        self.interfered = 0

    def reencrypt(
        self,
        user_id: str,
        expected_version: int,
        access_token_encrypted: str | None,
        refresh_token_encrypted: str | None,
        encryption_key_id: str,
    ) -> bool:
        if user_id == self.raced_user_id and not self.interfered:
            self.interfered += 1
            refreshed = self.update_tokens(
                user_id,
                expected_version,
                TokenUpdate(
                    access_token_encrypted=self.old_cipher.encrypt(
                        f"{TOKEN_TAG}PLAINTEXT-access-concurrent", user_id=user_id, field="access_token"
                    ),
                    refresh_token_encrypted=self.old_cipher.encrypt(
                        f"{TOKEN_TAG}PLAINTEXT-refresh-concurrent", user_id=user_id, field="refresh_token"
                    ),
                    encryption_key_id=self.old_cipher.active_key_id,
                    expires_at=EXPIRES_AT,
                ),
            )
            assert refreshed is not None
        return super().reencrypt(
            user_id, expected_version, access_token_encrypted, refresh_token_encrypted, encryption_key_id
        )


def test_row_refreshed_during_the_pass_is_left_to_the_winner_and_picked_up_next_pass(
    database_url: str, clean_table: None, old_ring: KeyRing
) -> None:
    old_cipher = TokenCipher(old_ring)
    racing_store = StoreWithConcurrentRefresh(database_url, "user-04", old_cipher)
    try:
        seed(racing_store, old_cipher, 10)
        new_cipher = TokenCipher(rotate(old_ring))

        first = reencrypt_rows(racing_store, new_cipher, page_size=3)

        assert racing_store.interfered == 1
        assert first == ReencryptReport(scanned=10, reencrypted=9, lost_races=1, failed=0, pages=4)
        raced = stored(racing_store, "user-04")
        # The concurrent refresh won: its tokens are there, under the key it used.
        assert raced.encryption_key_id == "k-old"
        assert decrypted(old_cipher, raced) == (
            f"{TOKEN_TAG}PLAINTEXT-access-concurrent",
            f"{TOKEN_TAG}PLAINTEXT-refresh-concurrent",
        )
        assert racing_store.count_by_key_id() == {new_cipher.active_key_id: 9, "k-old": 1}

        second = reencrypt_rows(racing_store, new_cipher, page_size=3)

        assert second == ReencryptReport(scanned=1, reencrypted=1, lost_races=0, failed=0, pages=1)
        moved = stored(racing_store, "user-04")
        assert moved.encryption_key_id == new_cipher.active_key_id
        assert decrypted(new_cipher, moved) == (
            f"{TOKEN_TAG}PLAINTEXT-access-concurrent",
            f"{TOKEN_TAG}PLAINTEXT-refresh-concurrent",
        )
    finally:
        racing_store.close()


def test_row_that_does_not_decrypt_is_counted_logged_by_ids_and_skipped(
    store: PostgresTokenStore, old_ring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    seed(store, TokenCipher(old_ring), 5)
    # One row under a key the ring lost, one whose ciphertext was moved from another user.
    seed(store, TokenCipher(KeyRing.generate("k-lost")), 1, prefix="orphan")
    donor = stored(store, "user-00")
    victim = stored(store, "user-03")
    assert store.reencrypt(
        "user-03", victim.version, donor.access_token_encrypted, donor.refresh_token_encrypted, "k-old"
    )
    broken_before = {user_id: stored(store, user_id) for user_id in ("orphan-00", "user-03")}
    new_cipher = TokenCipher(rotate(old_ring))
    caplog.set_level(logging.INFO, logger="token_manager.rotation")

    report = reencrypt_rows(store, new_cipher, page_size=3)

    assert report == ReencryptReport(scanned=6, reencrypted=4, lost_races=0, failed=2, pages=2)
    for user_id, before in broken_before.items():
        assert stored(store, user_id) == before
    warnings = [record for record in rotation_records(caplog) if record.levelno == logging.WARNING]
    assert sorted((record.user_id, record.encryption_key_id) for record in warnings) == [  # type: ignore[attr-defined]
        ("orphan-00", "k-lost"),
        ("user-03", "k-old"),
    ]
    assert "PLAINTEXT" not in everything_logged(caplog)
    assert TOKEN_TAG[:4] not in everything_logged(caplog)


def test_rotation_logs_counts_and_ids_but_no_token_value(
    store: PostgresTokenStore, old_ring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    old_cipher = TokenCipher(old_ring)
    rows = seed(store, old_cipher, 7)
    seed(store, TokenCipher(KeyRing.generate("k-lost")), 1, prefix="orphan")
    ciphertexts_before = {
        value
        for user_id in [row.user_id for row in rows] + ["orphan-00"]
        for value in (stored(store, user_id).access_token_encrypted, stored(store, user_id).refresh_token_encrypted)
    }
    rotated = rotate(old_ring)
    new_cipher = TokenCipher(rotated)
    caplog.set_level(logging.DEBUG)

    reencrypt_rows(store, new_cipher, page_size=3)
    retire_unused_keys(store, rotated)

    ciphertexts_after = {
        value
        for row in rows
        for value in (
            stored(store, row.user_id).access_token_encrypted,
            stored(store, row.user_id).refresh_token_encrypted,
        )
    }
    logged = everything_logged(caplog)
    assert rotation_records(caplog), "the pass logs its pages"
    assert "PLAINTEXT" not in logged
    assert TOKEN_TAG[:4] not in logged
    for value in ciphertexts_before | ciphertexts_after:
        assert value is not None
        assert value not in logged
        assert value[:16] not in logged
    for key in rotated.keys.values():
        assert key.hex() not in logged
        assert repr(key) not in logged


# --- retirement ---------------------------------------------------------------------------


def test_retire_key_refuses_a_key_rows_still_use(store: PostgresTokenStore, old_ring: KeyRing) -> None:
    seed(store, TokenCipher(old_ring), 2)
    rotated = rotate(old_ring)
    with pytest.raises(KeyRingError, match="'k-old' still encrypts 2 rows"):
        retire_key(store, rotated, "k-old")
    assert "k-old" in rotated.keys


def test_retire_key_drops_a_key_no_row_uses(store: PostgresTokenStore, old_ring: KeyRing) -> None:
    seed(store, TokenCipher(old_ring), 2)
    retired = retire_key(store, old_ring, "k-older")
    assert set(retired.keys) == {"k-old"}
    assert retired.active_key_id == "k-old"


def test_retire_key_refuses_the_active_key_even_when_no_row_uses_it(
    store: PostgresTokenStore, old_ring: KeyRing
) -> None:
    with pytest.raises(KeyRingError, match="active key 'k-old'"):
        retire_key(store, old_ring, "k-old")
    with pytest.raises(KeyRingError, match="does not hold"):
        retire_key(store, old_ring, "k-never")


def test_retire_unused_keys_spares_active_kept_and_used_keys(store: PostgresTokenStore, old_ring: KeyRing) -> None:
    seed(store, TokenCipher(old_ring), 2)  # rows under k-old
    ring = KeyRing.from_json(old_ring.to_json()).with_new_active_key("k-spare").with_new_active_key("k-prev")
    ring = ring.with_new_active_key("k-active")  # no row uses it yet: still never retired

    report = retire_unused_keys(store, ring, keep=["k-prev"])

    assert report.retired == ("k-older", "k-spare")
    assert report.kept_in_use == ("k-old",)
    assert set(report.ring.keys) == {"k-old", "k-prev", "k-active"}
    assert report.ring.active_key_id == "k-active"
    assert set(ring.keys) == {"k-older", "k-old", "k-spare", "k-prev", "k-active"}


def test_full_rotation_then_retirement_leaves_only_the_new_key_and_every_row_readable(
    store: PostgresTokenStore, old_ring: KeyRing
) -> None:
    rows = seed(store, TokenCipher(old_ring), 10)
    rotated = rotate(old_ring)
    persisted = KeyRing.from_json(rotated.to_json())  # the caller stores the ring before re-encrypting

    assert reencrypt_rows(store, TokenCipher(persisted), page_size=3).reencrypted == 10
    report = retire_unused_keys(store, persisted)

    assert report.retired == ("k-old", "k-older")
    assert list(report.ring.keys) == [rotated.active_key_id]
    final_cipher = TokenCipher(KeyRing.from_json(report.ring.to_json()))
    for row in rows:
        assert decrypted(final_cipher, stored(store, row.user_id)) == (row.access_token, row.refresh_token)
