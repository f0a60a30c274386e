"""The key ring and TokenCipher: AES-256-GCM bound to user and field, strict parsing, no leaks."""

from __future__ import annotations

import base64
import itertools
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from token_manager import crypto
from token_manager.crypto import KEY_BYTES, TOKEN_FIELDS, KeyRing, TokenCipher, new_key_id
from token_manager.errors import KeyRingError, TokenDecryptionError

# Distinctive values: if one shows up in a message or repr, something leaked.
PLAINTEXT = "PLAINTEXT-MARKER-access-7f3c9e"
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_A_B64 = base64.b64encode(KEY_A).decode()
KEY_B_B64 = base64.b64encode(KEY_B).decode()
FIELDS = sorted(TOKEN_FIELDS)


def ring_json(**document: object) -> str:
    return json.dumps(document)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing("k-new", {"k-old": KEY_A, "k-new": KEY_B})


@pytest.fixture
def cipher(ring: KeyRing) -> TokenCipher:
    return TokenCipher(ring)


def assert_no_leak(text: str, *secrets: str | bytes) -> None:
    for secret in secrets:
        shown = secret if isinstance(secret, str) else secret.hex()
        assert shown not in text
        if isinstance(secret, bytes):
            assert base64.b64encode(secret).decode() not in text
            assert base64.urlsafe_b64encode(secret).decode().rstrip("=") not in text
            assert repr(secret) not in text


# --- TokenCipher: round trips and binding ----------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_value_decrypts_for_its_own_user_and_field(cipher: TokenCipher, field: str) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field=field)
    assert PLAINTEXT not in sealed
    assert cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field=field) == PLAINTEXT


def test_non_ascii_and_empty_plaintexts_round_trip(cipher: TokenCipher) -> None:
    for plaintext in ("", "jeton-été-🔑", "x" * 4096):
        sealed = cipher.encrypt(plaintext, user_id="user-1", field="cache")
        assert cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field="cache") == plaintext


def test_encrypt_always_uses_the_active_key(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    assert cipher.active_key_id == "k-new"
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(sealed, key_id="k-old", user_id="user-1", field="access_token")
    assert cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field="access_token") == PLAINTEXT


def test_value_under_an_older_key_still_decrypts_after_rotation() -> None:
    old_ring = KeyRing("k-old", {"k-old": KEY_A})
    sealed = TokenCipher(old_ring).encrypt(PLAINTEXT, user_id="user-1", field="refresh_token")
    rotated = TokenCipher(old_ring.with_new_active_key("k-new"))
    assert rotated.decrypt(sealed, key_id="k-old", user_id="user-1", field="refresh_token") == PLAINTEXT


def test_value_moved_to_another_user_fails(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    for other_user in ("user-2", "user-10", "user-", "", "USER-1", "user-1 ", "user-1\x00"):
        with pytest.raises(TokenDecryptionError):
            cipher.decrypt(sealed, key_id="k-new", user_id=other_user, field="access_token")


@pytest.mark.parametrize(("written_as", "read_as"), list(itertools.permutations(FIELDS, 2)))
def test_value_moved_to_another_field_fails(cipher: TokenCipher, written_as: str, read_as: str) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field=written_as)
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field=read_as)


def test_associated_data_is_unambiguous_for_user_ids_that_look_like_separators() -> None:
    # Pairs that a naive "user|field" or "user:field" join would map to the same bytes.
    tricky_users = ["a", "a|access_token", "a:access_token", "a\x00", "", "\x00\x00\x00\x05", "é", "e\u0301"]
    seen = {crypto._associated_data(user, field) for user in tricky_users for field in FIELDS}
    assert len(seen) == len(tricky_users) * len(FIELDS)
    assert all(aad.startswith(b"sonos-token-aad/v1") for aad in seen)


def test_associated_data_layout_is_tag_then_length_prefixed_user_and_field() -> None:
    # Stored values depend on this exact layout: changing it strands every stored token.
    expected = b"sonos-token-aad/v1" + (6).to_bytes(4, "big") + b"user-1" + (12).to_bytes(4, "big") + b"access_token"
    assert crypto._associated_data("user-1", "access_token") == expected
    assert crypto._associated_data("é", "cache") == (
        b"sonos-token-aad/v1" + (2).to_bytes(4, "big") + "é".encode() + (5).to_bytes(4, "big") + b"cache"
    )


def test_value_written_by_an_earlier_release_still_decrypts() -> None:
    # A known-answer vector: key bytes 0..31, nonce bytes 0..11, user-1 / access_token.
    stored = "AAECAwQFBgcICQoLLGy5bKvIo3X-NvL5nJ0XBua4Gsb5qJhcWY69lvcvhCDpyg=="
    cipher = TokenCipher(KeyRing("k-2025", {"k-2025": KEY_A}))
    assert cipher.decrypt(stored, key_id="k-2025", user_id="user-1", field="access_token") == "known-answer-token"


def test_unknown_field_is_a_programming_error(cipher: TokenCipher) -> None:
    with pytest.raises(ValueError, match="unknown token field"):
        cipher.encrypt(PLAINTEXT, user_id="user-1", field="access-token")
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    with pytest.raises(ValueError, match="unknown token field"):
        cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field="token")


# --- TokenCipher: every malformed value fails, and only with TokenDecryptionError -------


def test_flipping_any_byte_of_the_sealed_value_fails(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    raw = base64.urlsafe_b64decode(sealed)
    assert len(raw) == 12 + len(PLAINTEXT) + 16
    for position in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(raw)
            tampered[position] ^= mask
            text = base64.urlsafe_b64encode(bytes(tampered)).decode()
            with pytest.raises(TokenDecryptionError):
                cipher.decrypt(text, key_id="k-new", user_id="user-1", field="access_token")


def test_changing_any_character_of_the_text_fails(cipher: TokenCipher) -> None:
    # Includes the last data character, whose low bits base64 ignores: the strict
    # decoder must still refuse the non-canonical text.
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. \n"
    for position, original in enumerate(sealed):
        for replacement in alphabet:
            if replacement == original:
                continue
            text = sealed[:position] + replacement + sealed[position + 1 :]
            with pytest.raises(TokenDecryptionError):
                cipher.decrypt(text, key_id="k-new", user_id="user-1", field="access_token")


def test_every_truncation_fails(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    raw = base64.urlsafe_b64decode(sealed)
    for length in range(len(sealed)):
        with pytest.raises(TokenDecryptionError):
            cipher.decrypt(sealed[:length], key_id="k-new", user_id="user-1", field="access_token")
    for length in range(len(raw)):
        text = base64.urlsafe_b64encode(raw[:length]).decode()
        with pytest.raises(TokenDecryptionError):
            cipher.decrypt(text, key_id="k-new", user_id="user-1", field="access_token")


@pytest.mark.parametrize(
    "garble",
    [
        pytest.param(lambda s: s.rstrip("="), id="padding-stripped"),
        pytest.param(lambda s: s + "=", id="extra-padding"),
        pytest.param(lambda s: s.replace("-", "+").replace("_", "/") + "+/", id="standard-alphabet"),
        pytest.param(lambda s: s[:10] + "\n" + s[10:], id="newline-inside"),
        pytest.param(lambda s: " " + s, id="leading-space"),
        pytest.param(lambda s: s[:5] + "é" + s[6:], id="non-ascii"),
        pytest.param(lambda s: s[:5] + "!" + s[6:], id="bad-character"),
        pytest.param(lambda s: s + s, id="doubled"),
        pytest.param(lambda s: "k-new." + s, id="key-id-prefix-left-on"),
    ],
)
def test_garbled_text_fails(cipher: TokenCipher, garble: object) -> None:
    sealed = cipher.encrypt(PLAINTEXT + "x", user_id="user-1", field="cache")
    text = garble(sealed)  # type: ignore[operator]
    assert text != sealed
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(text, key_id="k-new", user_id="user-1", field="cache")


@pytest.mark.parametrize("value", [None, b"bytes", 123])
def test_non_text_value_fails(cipher: TokenCipher, value: object) -> None:
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(value, key_id="k-new", user_id="user-1", field="cache")  # type: ignore[arg-type]


def test_unknown_key_id_fails(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    assert not cipher.knows("k-gone")
    for key_id in ("k-gone", "", "K-NEW", None):
        with pytest.raises(TokenDecryptionError):
            cipher.decrypt(sealed, key_id=key_id, user_id="user-1", field="access_token")  # type: ignore[arg-type]


def test_same_key_id_with_a_different_key_fails(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
    impostor = TokenCipher(KeyRing.generate("k-new"))
    with pytest.raises(TokenDecryptionError):
        impostor.decrypt(sealed, key_id="k-new", user_id="user-1", field="access_token")


def test_decryption_errors_carry_no_data_and_no_chained_cause(cipher: TokenCipher) -> None:
    sealed = cipher.encrypt(PLAINTEXT, user_id="user-secretive", field="access_token")
    raw = bytearray(base64.urlsafe_b64decode(sealed))
    raw[-1] ^= 1
    attempts = [
        {"ciphertext": sealed, "key_id": "k-gone", "user_id": "user-secretive"},
        {"ciphertext": sealed, "key_id": "k-new", "user_id": "user-other"},
        {"ciphertext": base64.urlsafe_b64encode(bytes(raw)).decode(), "key_id": "k-new", "user_id": "user-secretive"},
        {"ciphertext": sealed[:-3] + "!!!", "key_id": "k-new", "user_id": "user-secretive"},
        {"ciphertext": sealed[:20], "key_id": "k-new", "user_id": "user-secretive"},
    ]
    for attempt in attempts:
        with pytest.raises(TokenDecryptionError) as caught:
            cipher.decrypt(field="access_token", **attempt)
        error = caught.value
        message = str(error)
        assert message
        assert_no_leak(message, PLAINTEXT, sealed, sealed[:20], "user-secretive", KEY_A, KEY_B)
        assert error.__cause__ is None
        assert error.__suppress_context__ or error.__context__ is None


def test_decrypted_bytes_that_are_not_utf8_fail_without_showing_them(cipher: TokenCipher) -> None:
    aead = AESGCM(KEY_B)
    nonce = bytes(12)
    sealed = base64.urlsafe_b64encode(
        nonce + aead.encrypt(nonce, b"\xffsecret-bytes", crypto._associated_data("user-1", "cache"))
    ).decode()
    with pytest.raises(TokenDecryptionError) as caught:
        cipher.decrypt(sealed, key_id="k-new", user_id="user-1", field="cache")
    assert "secret-bytes" not in str(caught.value)
    assert caught.value.__suppress_context__


# --- TokenCipher: nonces and construction cost -----------------------------------------


def test_100000_encryptions_never_repeat_a_nonce(cipher: TokenCipher) -> None:
    nonces = set()
    for _ in range(100_000):
        raw = base64.urlsafe_b64decode(cipher.encrypt("same plaintext", user_id="user-1", field="access_token"))
        nonces.add(raw[:12])
    assert len(nonces) == 100_000


def test_nonce_comes_from_os_urandom(cipher: TokenCipher, monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[int] = []

    def fake_urandom(size: int) -> bytes:
        requested.append(size)
        return bytes([7]) * size

    monkeypatch.setattr("token_manager.crypto.os.urandom", fake_urandom)
    raw = base64.urlsafe_b64decode(cipher.encrypt(PLAINTEXT, user_id="user-1", field="cache"))
    assert requested == [12]
    assert raw[:12] == bytes([7]) * 12


def test_one_aesgcm_per_key_is_built_once_not_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[bytes] = []

    def counting_aesgcm(key: bytes) -> object:
        built.append(key)
        return AESGCM(key)

    monkeypatch.setattr("token_manager.crypto.AESGCM", counting_aesgcm)
    ring = KeyRing("k3", {"k1": KEY_A, "k2": KEY_B, "k3": bytes(range(200, 232))})
    cipher = TokenCipher(ring)
    assert sorted(built) == sorted(ring.keys.values())
    for _ in range(20):
        sealed = cipher.encrypt(PLAINTEXT, user_id="user-1", field="access_token")
        cipher.decrypt(sealed, key_id="k3", user_id="user-1", field="access_token")
    assert len(built) == 3


def test_cipher_repr_shows_ids_not_keys(cipher: TokenCipher) -> None:
    text = repr(cipher)
    assert "k-new" in text
    assert_no_leak(text, KEY_A, KEY_B)


# --- KeyRing ------------------------------------------------------------------------------


def test_key_ring_round_trips_through_json() -> None:
    ring = KeyRing("k-new", {"k-old": KEY_A, "k-new": KEY_B})
    document = json.loads(ring.to_json())
    assert document == {"active": "k-new", "keys": {"k-new": KEY_B_B64, "k-old": KEY_A_B64}}
    assert KeyRing.from_json(ring.to_json()) == ring


def test_key_ring_accepts_urlsafe_base64_keys() -> None:
    key = bytes([0xFB, 0xFF] * 16)  # encodes with '+' and '/' in the standard alphabet
    text = ring_json(active="k1", keys={"k1": base64.urlsafe_b64encode(key).decode()})
    assert KeyRing.from_json(text).keys["k1"] == key


def test_generated_ring_has_one_fresh_active_key() -> None:
    first, second = KeyRing.generate(), KeyRing.generate("k-chosen")
    assert list(first.keys) == [first.active_key_id]
    assert re.fullmatch(r"k\d{8}T\d{6}Z-[0-9a-f]{4}", first.active_key_id)
    assert second.active_key_id == "k-chosen"
    assert len(first.keys[first.active_key_id]) == KEY_BYTES
    assert first.keys[first.active_key_id] != second.keys["k-chosen"]


def test_with_new_active_key_keeps_old_keys_and_activates_the_new_one() -> None:
    ring = KeyRing("k-old", {"k-old": KEY_A})
    rotated = ring.with_new_active_key("k-new")
    assert rotated.active_key_id == "k-new"
    assert rotated.keys["k-old"] == KEY_A
    assert len(rotated.keys["k-new"]) == KEY_BYTES
    assert rotated.keys["k-new"] != KEY_A
    assert ring.active_key_id == "k-old"
    assert list(ring.keys) == ["k-old"]
    with pytest.raises(KeyRingError, match="already in the ring"):
        rotated.with_new_active_key("k-old")


def test_without_keys_refuses_the_active_key_and_unknown_ids() -> None:
    ring = KeyRing("k-new", {"k-old": KEY_A, "k-new": KEY_B})
    assert list(ring.without_keys(["k-old"]).keys) == ["k-new"]
    with pytest.raises(KeyRingError, match="active key 'k-new'"):
        ring.without_keys(["k-old", "k-new"])
    with pytest.raises(KeyRingError, match="does not hold: 'k-typo'"):
        ring.without_keys(["k-typo"])
    with pytest.raises(KeyRingError, match="malformed") as caught:
        ring.without_keys([KEY_A_B64])
    assert KEY_A_B64 not in str(caught.value)
    assert set(ring.keys) == {"k-old", "k-new"}


def test_key_ring_is_immutable() -> None:
    source = {"k1": KEY_A}
    ring = KeyRing("k1", source)
    source["k2"] = KEY_B
    assert list(ring.keys) == ["k1"]
    with pytest.raises(TypeError):
        ring.keys["k2"] = KEY_B  # type: ignore[index]
    with pytest.raises(AttributeError):
        ring.active_key_id = "k2"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ring._keys = {}


def test_key_ring_repr_and_str_show_no_key_material() -> None:
    ring = KeyRing("k-new", {"k-old": KEY_A, "k-new": KEY_B})
    for text in (repr(ring), str(ring), f"{ring}", repr([ring])):
        assert "k-new" in text
        assert_no_leak(text, KEY_A, KEY_B)


SECRET_16 = b"SIXTEEN-BYTE-KEY"
SECRET_16_B64 = base64.b64encode(SECRET_16).decode()
NOT_BASE64_SECRET = "KEYTEXT-MARKER!not*base64"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param("", "not valid JSON", id="empty-text"),
        pytest.param('{"active": "k1", "keys": {"k1": "' + KEY_A_B64 + '"', "not valid JSON", id="truncated-json"),
        pytest.param(json.dumps([KEY_A_B64]), "must be a JSON object", id="array"),
        pytest.param(json.dumps(KEY_A_B64), "must be a JSON object", id="string"),
        pytest.param(ring_json(keys={"k1": KEY_A_B64}), 'no "active"', id="missing-active"),
        pytest.param(
            ring_json(active=7, keys={"k1": KEY_A_B64}), '"active" must be a non-empty string', id="active-type"
        ),
        pytest.param(
            ring_json(active="", keys={"k1": KEY_A_B64}), '"active" must be a non-empty string', id="active-empty"
        ),
        pytest.param(ring_json(active="k1"), 'no "keys"', id="missing-keys"),
        pytest.param(ring_json(active="k1", keys=[KEY_A_B64]), '"keys" must be a JSON object', id="keys-array"),
        pytest.param(ring_json(active="k1", keys={}), "no keys", id="empty-ring"),
        pytest.param(ring_json(active="k1", keys={"k1": 12345}), "key 'k1' must be a base64 string", id="key-number"),
        pytest.param(
            ring_json(active="k1", keys={"k1": NOT_BASE64_SECRET}), "key 'k1' is not valid base64", id="bad-b64"
        ),
        pytest.param(
            ring_json(active="k1", keys={"k1": KEY_A_B64.rstrip("=")}), "key 'k1' is not valid base64", id="unpadded"
        ),
        pytest.param(
            ring_json(active="k1", keys={"k1": KEY_A_B64, "k2": SECRET_16_B64}),
            "key 'k2' is 16 bytes; AES-256-GCM needs 32",
            id="short-key",
        ),
        pytest.param(
            ring_json(active="k1", keys={"k1": base64.b64encode(KEY_A + b"EXTRA").decode()}),
            "key 'k1' is 37 bytes",
            id="long-key",
        ),
        pytest.param(
            ring_json(active="k9", keys={"k1": KEY_A_B64}), "active key id 'k9' is not among", id="active-missing"
        ),
        pytest.param(
            ring_json(active="k1", keys={"k1": KEY_A_B64, "k2": KEY_A_B64}),
            "keys 'k1' and 'k2' hold the same key material",
            id="same-key-twice",
        ),
        pytest.param(
            '{"active": "k1", "keys": {"k1": "' + KEY_A_B64 + '", "k1": "' + KEY_B_B64 + '"}}',
            "repeats 'k1'",
            id="repeated-id",
        ),
        pytest.param(
            ring_json(active="k1", keys={"k1": KEY_B_B64, KEY_A_B64: "k1"}),
            "key id number 2 in the key ring is not a valid key id",
            id="key-pasted-as-id",
        ),
        pytest.param(
            ring_json(active=KEY_A_B64, keys={"k1": KEY_B_B64}),
            "the active key id in the key ring is not a valid key id",
            id="key-pasted-as-active",
        ),
        pytest.param(
            ring_json(active="k.1", keys={"k.1": KEY_A_B64}),
            "key id number 1 in the key ring is not a valid key id",
            id="dot-in-id",
        ),
    ],
)
def test_bad_key_ring_fails_at_load_naming_the_problem_without_the_key(text: str, problem: str) -> None:
    with pytest.raises(KeyRingError) as caught:
        KeyRing.from_json(text)
    message = str(caught.value)
    assert problem in message
    assert_no_leak(message, KEY_A, KEY_B, SECRET_16, NOT_BASE64_SECRET, SECRET_16_B64, KEY_A_B64.rstrip("="))
    # Whatever key text the case holds (every long string in it), none of it is echoed.
    for key_text in re.findall(r'"([^"]{12,})"', text):
        assert key_text not in message
    # A chained JSONDecodeError would carry the whole document into tracebacks.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


def test_key_ring_constructor_validates_like_from_json() -> None:
    with pytest.raises(KeyRingError, match="no keys"):
        KeyRing("k1", {})
    with pytest.raises(KeyRingError, match="'k1' is 16 bytes"):
        KeyRing("k1", {"k1": SECRET_16})
    with pytest.raises(KeyRingError, match="not among"):
        KeyRing("k2", {"k1": KEY_A})
    with pytest.raises(KeyRingError, match="not bytes"):
        KeyRing("k1", {"k1": KEY_A_B64})  # type: ignore[dict-item]


def test_key_ring_error_is_a_value_error_for_settings_to_wrap() -> None:
    assert issubclass(KeyRingError, ValueError)


# --- key ids ------------------------------------------------------------------------------


def test_new_key_id_names_the_utc_creation_time() -> None:
    key_id = new_key_id(datetime(2026, 12, 3, 19, 30, tzinfo=timezone(timedelta(hours=1))))
    assert re.fullmatch(r"k20261203T183000Z-[0-9a-f]{4}", key_id)


def test_new_key_ids_sort_by_creation_time() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    moments = [start + timedelta(days=30 * month, seconds=month) for month in range(40)]
    ids = [new_key_id(moment) for moment in moments]
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)


def test_new_key_id_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        new_key_id(datetime(2026, 1, 1))


def test_new_key_id_is_accepted_by_the_key_ring() -> None:
    key_id = new_key_id()
    assert KeyRing(key_id, {key_id: KEY_A}).active_key_id == key_id
