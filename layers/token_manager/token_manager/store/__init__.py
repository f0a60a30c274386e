"""Grant storage: one protocol, a Supabase (PostgREST) and a Postgres implementation."""

from __future__ import annotations

import importlib.util

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
        from token_manager.store.supabase import SupabaseTokenStore

        return SupabaseTokenStore(supabase_url, supabase_service_role_key)
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
