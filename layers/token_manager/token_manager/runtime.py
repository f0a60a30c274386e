"""The wired service, built once per container and only as far as a function needs it.

settings (environment, then SSM) -> key ring and cipher -> store -> Redis cache ->
Sonos client -> notifier -> :class:`SonosTokenManager`. Each part is built on first
use and kept for the container's life. A build that fails raises one
``ConfigurationError`` naming the setting or part, caches nothing, and forgets what it
had built, so the next invocation starts again (SSM back, parameter fixed) instead of
the container staying broken until it is recycled.

Heavy libraries (redis, requests, psycopg, postgrest, boto3) are imported inside the
builders: key rotation, for one, never loads the Redis client or the Sonos client. The
Sonos client waits for the first call that needs Sonos, so a fetch answered from the
cache never imports ``requests``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from token_manager.errors import ConfigurationError, KeyRingError, TokenServiceError
from token_manager.settings import Settings, load_key_ring_json, load_settings

if TYPE_CHECKING:
    from token_manager.crypto import KeyRing, TokenCipher
    from token_manager.manager import SonosTokenManager
    from token_manager.provider import SonosClient
    from token_manager.store.base import TokenStore

__all__ = [
    "KEY_RING_ENV",
    "KEY_RING_KMS_KEY_ENV",
    "get_cipher",
    "get_manager",
    "get_settings",
    "get_store",
    "load_current_key_ring",
    "persist_key_ring",
    "reset_for_tests",
]

logger = logging.getLogger(__name__)

KEY_RING_ENV = "TOKEN_ENCRYPTION_KEYS"
# The KMS key SSM encrypts the rotated ring with (an alias or key ARN); empty = SSM's default.
KEY_RING_KMS_KEY_ENV = "TOKEN_ENCRYPTION_KEYS_KMS_KEY_ID"

T = TypeVar("T")


@dataclass
class _Container:
    settings: Settings | None = None
    cipher: TokenCipher | None = None
    store: TokenStore | None = None
    manager: SonosTokenManager | None = None
    ssm_client: Any = None
    # How the Sonos client and the manager wait (retry backoff, lock polling); tests pass a recorder.
    sleep: Callable[[float], None] = time.sleep


_lock = threading.RLock()
_built = _Container()


# --------------------------------------------------------------------------- the parts


def get_settings() -> Settings:
    """The container's settings (one batched SSM read on first use)."""
    with _lock:
        if _built.settings is None:
            _built.settings = _build("settings", load_settings)
        return _built.settings


def get_cipher() -> TokenCipher:
    """The token cipher over the configured key ring."""
    with _lock:
        if _built.cipher is None:
            settings = get_settings()

            def build() -> TokenCipher:
                from token_manager.crypto import TokenCipher

                return TokenCipher(_parse_key_ring(settings.key_ring_json, settings))

            _built.cipher = _build("key ring", build)
        return _built.cipher


def get_store() -> TokenStore:
    """The grant store the settings select (Postgres for DATABASE_URL, else Supabase)."""
    with _lock:
        if _built.store is None:
            settings = get_settings()

            def build() -> TokenStore:
                from token_manager.store import store_from_settings

                return store_from_settings(
                    database_url=settings.database_url,
                    supabase_url=settings.supabase_url,
                    supabase_service_role_key=settings.supabase_service_role_key,
                )

            _built.store = _build("token store", build)
        return _built.store


def get_manager() -> SonosTokenManager:
    """The fully wired manager; its counts go to the invocation's metrics."""
    with _lock:
        if _built.manager is None:
            settings, cipher, store = get_settings(), get_cipher(), get_store()
            _built.manager = _build("token manager", lambda: _wire_manager(settings, cipher, store))
        return _built.manager


def _wire_manager(settings: Settings, cipher: TokenCipher, store: TokenStore) -> SonosTokenManager:
    from token_manager.cache import RedisCache
    from token_manager.manager import SonosTokenManager
    from token_manager.notifications import EventBridgeNotifier, NullNotifier, ReconnectNotifier
    from token_manager.observability import counters

    sleep = _built.sleep

    def sonos_client() -> SonosClient:
        from token_manager.provider import SonosClient, SonosClientConfig

        return SonosClient(
            SonosClientConfig(
                client_id=settings.client_id,
                client_secret=settings.client_secret,
                auth_base_url=settings.auth_base_url,
                control_base_url=settings.control_base_url,
                scope=settings.scope,
                revoke_url=settings.revoke_url,
                read_timeout=settings.sonos_http_timeout_seconds,
            ),
            sleep=sleep,
        )

    notifier: ReconnectNotifier = (
        EventBridgeNotifier(settings.event_bus_name) if settings.event_bus_name else NullNotifier()
    )

    def reload_key_ring() -> KeyRing:
        # A row under a key id this container does not know: another container rotated the ring.
        return _parse_key_ring(load_key_ring_json(settings), settings)

    return SonosTokenManager(
        store=store,
        cache=RedisCache.from_url(settings.redis_url),
        cipher=cipher,
        sonos=cast("SonosClient", _SonosClientOnFirstCall(sonos_client)),
        notifier=notifier,
        redirect_uris=settings.redirect_uris,
        refresh_ahead_seconds=settings.refresh_ahead_seconds,
        reload_key_ring=reload_key_ring,
        metrics=counters,
        sleep=sleep,
    )


class _SonosClientOnFirstCall:
    """The container's Sonos client, built by the first call that needs Sonos.

    Building it imports ``requests`` (tens of ms at cold start): a fetch answered from
    the cache and a refresher run with nothing due never call Sonos, so they never pay
    for it. Every attribute is the real client's; a failed build is retried next call.
    """

    def __init__(self, make: Callable[[], SonosClient]) -> None:
        self._make = make
        self._client: SonosClient | None = None
        self._lock = threading.Lock()  # the refresher calls Sonos from a pool

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # only the client's public calls are passed on
            raise AttributeError(name)
        return getattr(self._built(), name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r})"

    def close(self) -> None:
        """Close the client if one was built (closing never builds one)."""
        if self._client is not None:
            self._client.close()

    def _built(self) -> SonosClient:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self._make_reporting_configuration()
        return client

    def _make_reporting_configuration(self) -> SonosClient:
        try:
            return self._make()
        except TokenServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported by class only, as every build failure
            logger.error("could not build the service", extra={"part": "Sonos client", "error": type(exc).__name__})
            raise ConfigurationError(f"Could not build the Sonos client ({type(exc).__name__}).") from None


# --------------------------------------------------------------------------- key rotation


def load_current_key_ring() -> KeyRing:
    """The ring as stored right now in SSM, bypassing every cache.

    Rotation must start from the latest ring: a ring cached by this container could
    predate an earlier rotation, and rotating from it would drop a key rows now use.
    A ring set in the environment cannot be rotated: the new ring would go to SSM while
    every container kept reading the environment's, so rotation refuses to start.
    """
    settings = get_settings()
    if os.environ.get(KEY_RING_ENV, "").strip():
        raise ConfigurationError(
            f"Key rotation needs the key ring in SSM {settings.ssm_name('key_ring')}: {KEY_RING_ENV} is set in "
            "the environment and would shadow the rotated ring."
        )
    return _build("key ring", lambda: _parse_key_ring(load_key_ring_json(settings), settings))


def persist_key_ring(ring: KeyRing) -> None:
    """Write the ring to its SSM parameter as a SecureString (replacing the old value)."""
    settings = get_settings()
    name = settings.ssm_name("key_ring")
    request: dict[str, Any] = {"Name": name, "Value": ring.to_json(), "Type": "SecureString", "Overwrite": True}
    kms_key_id = os.environ.get(KEY_RING_KMS_KEY_ENV, "").strip()
    if kms_key_id:
        request["KeyId"] = kms_key_id
    try:
        _ssm_client().put_parameter(**request)
    except Exception as exc:  # noqa: BLE001 - any SDK failure: the rotation must stop here
        logger.error("could not write the rotated key ring", extra={"parameter": name, "error": type(exc).__name__})
        raise ConfigurationError(f"Could not write the key ring to SSM {name} ({type(exc).__name__}).") from None
    logger.info("key ring written", extra={"parameter": name, "active_key_id": ring.active_key_id})


def _ssm_client() -> Any:
    with _lock:
        if _built.ssm_client is None:
            import boto3

            _built.ssm_client = boto3.client("ssm")
        return _built.ssm_client


# --------------------------------------------------------------------------- helpers


def reset_for_tests(*, sleep: Callable[[float], None] = time.sleep) -> None:
    """Forget every part, as a fresh container would start (also Powertools' SSM cache).

    ``sleep`` is what the parts built from now on wait with (tests pass a recorder).
    """
    with _lock:
        _forget()
        _built.ssm_client = None
        _built.sleep = sleep
    parameters = sys.modules.get("aws_lambda_powertools.utilities.parameters")
    if parameters is not None:
        parameters.clear_caches()


def _forget() -> None:
    for part in (_built.manager, _built.store):
        close = getattr(part, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - a part that cannot close cleanly is dropped anyway
                logger.warning(
                    "could not close a part", extra={"part": type(part).__name__, "error": type(exc).__name__}
                )
    _built.settings = _built.cipher = _built.store = _built.manager = None


def _build(part: str, build: Callable[[], T]) -> T:
    with _lock, _failure_forgets_everything(part):
        return build()


@contextmanager
def _failure_forgets_everything(part: str) -> Iterator[None]:
    """Turn any failure into one ConfigurationError and drop what was built, so the
    next invocation rebuilds from fresh settings instead of a half-built container."""
    try:
        yield
    except TokenServiceError:
        _forget()
        raise
    except Exception as exc:  # noqa: BLE001 - the message may hold a URL or a secret: report the class only
        _forget()
        logger.error("could not build the service", extra={"part": part, "error": type(exc).__name__})
        raise ConfigurationError(f"Could not build the {part} ({type(exc).__name__}).") from None


def _parse_key_ring(text: str, settings: Settings) -> KeyRing:
    from token_manager.crypto import KeyRing

    try:
        return KeyRing.from_json(text)
    except KeyRingError as exc:
        # KeyRingError names the problem and never a key; the caller gets only the setting.
        source = _key_ring_source(settings)
        logger.error("key ring is unusable", extra={"setting": source, "problem": str(exc)})
        raise ConfigurationError(f"{source} is not a usable key ring.") from None


def _key_ring_source(settings: Settings) -> str:
    if os.environ.get(KEY_RING_ENV, "").strip():
        return KEY_RING_ENV
    return f"SSM {settings.ssm_name('key_ring')}"
