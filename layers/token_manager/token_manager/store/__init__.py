"""Grant storage: one protocol, a Supabase (PostgREST) and a Postgres implementation."""

from __future__ import annotations

from token_manager.store.base import TokenStore

__all__ = ["TokenStore"]
