"""Token encryption: the key ring and AES-256-GCM values bound to their owner and field."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from token_manager.errors import KeyRingError, TokenDecryptionError

__all__ = [
    "FIELD_ACCESS_TOKEN",
    "FIELD_CACHE",
    "FIELD_REFRESH_TOKEN",
    "KEY_BYTES",
    "TOKEN_FIELDS",
    "KeyRing",
    "TokenCipher",
    "new_key_id",
]

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16

FIELD_ACCESS_TOKEN: Final = "access_token"  # noqa: S105  (a field name, not a secret)
FIELD_REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105  (a field name, not a secret)
FIELD_CACHE: Final = "cache"
TOKEN_FIELDS: Final = frozenset({FIELD_ACCESS_TOKEN, FIELD_REFRESH_TOKEN, FIELD_CACHE})

# Names the associated-data layout, so a future layout can never authenticate a value
# written under this one (or the other way round).
_AAD_FORMAT_TAG: Final = b"sonos-token-aad/v1"

# At most 32 characters from a small alphabet: a base64 (44 or 43 chars) or hex (64) key
# pasted where an id belongs fails this check, and ids failing it are never echoed.
# No '.', so callers may join "key_id.ciphertext" and split at the first dot.
_KEY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_KEY_ID_RULE: Final = "1-32 characters: letters, digits, '_' or '-', starting with a letter or digit"

_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def new_key_id(now: datetime | None = None) -> str:
    """A fresh key id that sorts by creation time, e.g. ``k20261203T183000Z-3f9a``."""
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        raise ValueError("new_key_id needs a timezone-aware datetime")
    return f"k{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


class KeyRing:
    """Every key a stored value may be under, and the one new values are encrypted with.

    Immutable: the ``with_...``/``without_...`` methods return a new ring, which the
    caller persists (the ring's JSON lives in SSM).

    >>> ring = KeyRing.generate()
    >>> ring = ring.with_new_active_key()
    >>> len(ring.keys)
    2
    """

    __slots__ = ("_active_key_id", "_keys")

    _active_key_id: str
    _keys: Mapping[str, bytes]

    def __init__(self, active_key_id: str, keys: Mapping[str, bytes]) -> None:
        checked: dict[str, bytes] = {}
        for position, (key_id, material) in enumerate(keys.items(), start=1):
            _check_key_id(key_id, f"key id number {position}")
            if not isinstance(material, bytes | bytearray):
                raise KeyRingError(f"key {key_id!r} is not bytes")
            if len(material) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r} is {len(material)} bytes; AES-256-GCM needs {KEY_BYTES}")
            checked[key_id] = bytes(material)
        if not checked:
            raise KeyRingError("key ring has no keys")
        _check_key_id(active_key_id, "the active key id")
        if active_key_id not in checked:
            raise KeyRingError(f"active key id {active_key_id!r} is not among the ring's keys")
        _refuse_repeated_material(checked)
        object.__setattr__(self, "_active_key_id", active_key_id)
        object.__setattr__(self, "_keys", MappingProxyType(checked))

    @property
    def active_key_id(self) -> str:
        return self._active_key_id

    @property
    def keys(self) -> Mapping[str, bytes]:
        """Key id to 32 key bytes (read-only)."""
        return self._keys

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        """Parse ``{"active": id, "keys": {id: base64(32 bytes)}}``; raise KeyRingError naming the problem."""
        try:
            document = json.loads(text, object_pairs_hook=_object_refusing_repeated_names)
        except KeyRingError:
            raise
        except (TypeError, ValueError):
            # The decoder's exception holds the whole document: do not chain it.
            raise KeyRingError("key ring is not valid JSON") from None
        if not isinstance(document, dict):
            raise KeyRingError('key ring must be a JSON object {"active": ..., "keys": {...}}')
        if "active" not in document:
            raise KeyRingError('key ring has no "active" key id')
        active = document["active"]
        if not isinstance(active, str) or not active:
            raise KeyRingError('key ring "active" must be a non-empty string')
        if "keys" not in document:
            raise KeyRingError('key ring has no "keys" object')
        encoded_keys = document["keys"]
        if not isinstance(encoded_keys, dict):
            raise KeyRingError('key ring "keys" must be a JSON object of key id to base64 key')
        keys: dict[str, bytes] = {}
        for position, (key_id, encoded) in enumerate(encoded_keys.items(), start=1):
            _check_key_id(key_id, f"key id number {position}")
            keys[key_id] = _decode_key(key_id, encoded)
        return cls(active, keys)

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyRing:
        """A ring with one fresh random key, active."""
        new_id = new_key_id() if key_id is None else key_id
        return cls(new_id, {new_id: AESGCM.generate_key(bit_length=KEY_BYTES * 8)})

    def to_json(self) -> str:
        """The ring as stored in SSM; ``from_json`` reads it back unchanged."""
        encoded = {
            key_id: base64.b64encode(material).decode("ascii") for key_id, material in sorted(self._keys.items())
        }
        return json.dumps({"active": self._active_key_id, "keys": encoded})

    def with_new_active_key(self, key_id: str | None = None) -> KeyRing:
        """This ring plus one fresh random key, which becomes active. Old keys stay for decryption."""
        new_id = new_key_id() if key_id is None else key_id
        if new_id in self._keys:
            raise KeyRingError(f"key id {new_id!r} is already in the ring")
        return KeyRing(new_id, {**self._keys, new_id: AESGCM.generate_key(bit_length=KEY_BYTES * 8)})

    def without_keys(self, key_ids: Iterable[str]) -> KeyRing:
        """This ring minus ``key_ids``. Refuses the active key and ids the ring does not hold."""
        dropped = set(key_ids)
        if self._active_key_id in dropped:
            raise KeyRingError(f"refusing to drop the active key {self._active_key_id!r}")
        unknown = sorted(dropped.difference(self._keys))
        if unknown:
            # Ids that fail the id rule may be pasted key material: count them, do not echo them.
            described = [repr(key_id) if _is_valid_key_id(key_id) else "(a malformed id)" for key_id in unknown]
            raise KeyRingError(f"cannot drop keys the ring does not hold: {', '.join(described)}")
        return KeyRing(self._active_key_id, {k: v for k, v in self._keys.items() if k not in dropped})

    def __repr__(self) -> str:
        return f"KeyRing(active_key_id={self._active_key_id!r}, key_ids={tuple(sorted(self._keys))!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyRing):
            return NotImplemented
        return self._active_key_id == other._active_key_id and dict(self._keys) == dict(other._keys)

    __hash__ = None  # type: ignore[assignment]  # equal rings must hash equal; mappings do not hash

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("KeyRing is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("KeyRing is immutable")


class TokenCipher:
    """AES-256-GCM over the key ring: encrypts with the active key, decrypts by key id.

    Each value is ``urlsafe_b64(nonce(12) || ciphertext || tag(16))``, with associated
    data naming its user and field, so a value copied to another row or column fails.

    >>> cipher = TokenCipher(KeyRing.generate("k1"))
    >>> sealed = cipher.encrypt("secret", user_id="u1", field="access_token")
    >>> cipher.decrypt(sealed, key_id="k1", user_id="u1", field="access_token")
    'secret'
    """

    __slots__ = ("_active_aead", "_aeads", "_ring")

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        # One AESGCM per key, built here: the key schedule is paid once per container.
        self._aeads: dict[str, AESGCM] = {key_id: AESGCM(material) for key_id, material in ring.keys.items()}
        self._active_aead = self._aeads[ring.active_key_id]

    @property
    def ring(self) -> KeyRing:
        return self._ring

    @property
    def active_key_id(self) -> str:
        return self._ring.active_key_id

    def knows(self, key_id: str) -> bool:
        """Whether a value under ``key_id`` can be decrypted with this ring."""
        return key_id in self._aeads

    def encrypt(self, plaintext: str, *, user_id: str, field: str) -> str:
        """Encrypt under the active key (store ``active_key_id`` with the value)."""
        associated_data = _associated_data(user_id, field)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._active_aead.encrypt(nonce, plaintext.encode("utf-8"), associated_data)
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, ciphertext: str, *, key_id: str, user_id: str, field: str) -> str:
        """The plaintext, or TokenDecryptionError for any value this ring did not seal for this user and field."""
        associated_data = _associated_data(user_id, field)
        aead = self._aeads.get(key_id)
        if aead is None:
            raise TokenDecryptionError("the value's encryption key id is not in the key ring")
        raw = _decode_value(ciphertext)
        try:
            plaintext = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise TokenDecryptionError(
                "the value failed authentication: wrong key, tampered, or not this user's and field's value"
            ) from None
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            # The error object would carry the plaintext bytes: do not chain it.
            raise TokenDecryptionError("the decrypted value is not UTF-8 text") from None

    def __repr__(self) -> str:
        return f"TokenCipher(active_key_id={self.active_key_id!r}, key_ids={tuple(sorted(self._aeads))!r})"


def _associated_data(user_id: str, field: str) -> bytes:
    """Format tag, then user id and field, each length-prefixed: no two (user, field) pairs collide."""
    if field not in TOKEN_FIELDS:
        raise ValueError(f"unknown token field {field!r}; expected one of {sorted(TOKEN_FIELDS)}")
    if not isinstance(user_id, str):
        raise TypeError("user_id must be a string")
    parts = [_AAD_FORMAT_TAG]
    for text in (user_id, field):
        encoded = text.encode("utf-8")
        parts.append(len(encoded).to_bytes(4, "big"))
        parts.append(encoded)
    return b"".join(parts)


def _decode_value(ciphertext: str) -> bytes:
    """Strict decoding: only the exact text ``encrypt`` produces is accepted, so no two
    texts (e.g. differing in unused trailing bits, padding or stray characters) map to one value."""
    if not isinstance(ciphertext, str):
        raise TokenDecryptionError("the encrypted value is not text")
    try:
        raw = base64.urlsafe_b64decode(ciphertext.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise TokenDecryptionError("the encrypted value is not valid urlsafe base64") from None
    if base64.urlsafe_b64encode(raw).decode("ascii") != ciphertext:
        raise TokenDecryptionError("the encrypted value is not valid urlsafe base64")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise TokenDecryptionError("the encrypted value is too short to be a sealed value")
    return raw


def _is_valid_key_id(key_id: object) -> bool:
    return isinstance(key_id, str) and _KEY_ID_PATTERN.fullmatch(key_id) is not None


def _check_key_id(key_id: object, where: str) -> None:
    if not _is_valid_key_id(key_id):
        raise KeyRingError(f"{where} in the key ring is not a valid key id ({_KEY_ID_RULE})")


def _decode_key(key_id: str, encoded: Any) -> bytes:
    if not isinstance(encoded, str):
        raise KeyRingError(f"key {key_id!r} must be a base64 string")
    try:
        # Standard and urlsafe alphabets both accepted; stray characters and bad padding are not.
        return base64.b64decode(encoded.translate(_URLSAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise KeyRingError(f"key {key_id!r} is not valid base64") from None


def _refuse_repeated_material(keys: Mapping[str, bytes]) -> None:
    # Two ids for one key means a rotation that changed nothing: a copy-paste mistake.
    seen: dict[bytes, str] = {}
    for key_id, material in keys.items():
        if material in seen:
            raise KeyRingError(f"keys {seen[material]!r} and {key_id!r} hold the same key material")
        seen[material] = key_id


def _object_refusing_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal names; in a key ring that would
    # hide a key, so refuse it.
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            shown = repr(name) if _is_valid_key_id(name) or name in ("active", "keys") else "a name"
            raise KeyRingError(f"key ring JSON repeats {shown}")
        document[name] = value
    return document
