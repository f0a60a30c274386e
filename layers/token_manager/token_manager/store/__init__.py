"""Grant storage: one protocol, a Supabase (PostgREST) and a Postgres implementation."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import Any, cast

from token_manager.errors import ConfigurationError
from token_manager.store.base import TokenStore

__all__ = ["TokenStore", "store_from_settings"]


def store_from_settings(
    *,
    database_url: str | None,
    supabase_url: str | None,
    supabase_service_role_key: str | None,
) -> TokenStore:
    """The store the settings ask for: ``DATABASE_URL`` (a direct Postgres connection)
    wins; otherwise ``SUPABASE_URL`` with ``SUPABASE_SERVICE_ROLE_KEY``.

    Each implementation is imported only when chosen, so a Supabase container never
    loads psycopg and a Postgres one never loads httpx and postgrest.
    """
    database_url = (database_url or "").strip()
    supabase_url = (supabase_url or "").strip()
    supabase_service_role_key = (supabase_service_role_key or "").strip()

    if database_url:
        if not postgres_driver_available():
            raise ConfigurationError(
                "DATABASE_URL is set but psycopg is missing: deploy with the DatabaseUrl parameter "
                "(it attaches the Postgres driver layer) or use SUPABASE_URL."
            )
        from token_manager.store.postgres import PostgresTokenStore

        return PostgresTokenStore(database_url)
    if supabase_url and supabase_service_role_key:
        url, key = supabase_url, supabase_service_role_key

        def build() -> TokenStore:
            from token_manager.store.supabase import SupabaseTokenStore

            return SupabaseTokenStore(url, key)

        # httpx + postgrest cost ~100 ms of cold start; a fetch answered from the cache never needs them.
        return cast(TokenStore, _BuiltOnFirstUse(build))
    if supabase_url:
        raise ConfigurationError("SUPABASE_SERVICE_ROLE_KEY is not set (SUPABASE_URL is).")
    if supabase_service_role_key:
        raise ConfigurationError("SUPABASE_URL is not set (SUPABASE_SERVICE_ROLE_KEY is).")
    raise ConfigurationError(
        "No token storage is configured: set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY, or DATABASE_URL."
    )


def postgres_driver_available() -> bool:
    """Whether psycopg can be imported (it ships in its own layer), without importing it."""
    return importlib.util.find_spec("psycopg") is not None


class _BuiltOnFirstUse:
    """A store that is built, once and thread-safely, by the first call that needs it."""

    def __init__(self, build: Callable[[], TokenStore]) -> None:
        self._build = build
        self._store: TokenStore | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._build()
                store = self._store
        return getattr(store, name)

    def __repr__(self) -> str:
        return "TokenStore(built on first use)" if self._store is None else repr(self._store)
