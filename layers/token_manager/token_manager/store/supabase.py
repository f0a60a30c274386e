"""The grant store over Supabase's PostgREST API with the service-role key (production default)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
from postgrest import SyncPostgrestClient, SyncRequestBuilder, SyncSelectRequestBuilder
from postgrest.constants import DEFAULT_POSTGREST_CLIENT_HEADERS

from token_manager.errors import ConfigurationError, StorageUnavailable
from token_manager.models import NewGrant, StoredGrant, TokenStatus, TokenUpdate
from token_manager.store import _rows
from token_manager.store.base import TABLE
from token_manager.store.errors import constraint_named_in, rejection

logger = logging.getLogger(__name__)

SELECTED_COLUMNS = ",".join(_rows.GRANT_COLUMNS)
# Rows per request when counting key ids. Supabase caps a response at its max-rows
# setting (1000 by default) without saying so, which is why paging below stops on an
# empty page rather than on a short one.
COUNT_PAGE_SIZE = 1000


class SupabaseTokenStore:
    """Grants in ``sonos_tokens`` through PostgREST (``{url}/rest/v1``).

    Only the ``postgrest`` package is used, not ``supabase``: the full client adds
    about a third of a second to every cold start and this store needs nothing else
    from it. Every conditional write is a filtered ``PATCH`` with
    ``Prefer: return=representation``; an empty list back means the version moved
    (or the grant is no longer active) and the race was lost.

    The service-role key is sent in the ``apikey`` and ``Authorization`` headers only;
    it appears in no URL, repr, exception or log line.

    >>> store = SupabaseTokenStore("https://abc.supabase.co", service_role_key)
    >>> store.get("user-1") is None
    True
    """

    def __init__(
        self,
        url: str,
        service_role_key: str,
        *,
        http_client: httpx.Client | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not service_role_key.strip():
            raise ConfigurationError("SUPABASE_SERVICE_ROLE_KEY is empty.")
        self._url = url.rstrip("/")
        # With a client of our own we own its timeout; a caller's client keeps the one
        # it was built with (PostgREST's own timeout option is then ignored anyway).
        self._owns_http_client = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=httpx.Timeout(timeout))
        try:
            self._postgrest = SyncPostgrestClient(
                f"{self._url}/rest/v1",
                headers={
                    **DEFAULT_POSTGREST_CLIENT_HEADERS,
                    "apikey": service_role_key,
                    "Authorization": f"Bearer {service_role_key}",
                },
                http_client=self._http,
                # Its retries sleep for seconds inside a Lambda; the caller decides.
                retry_enabled=False,
            )
        except ValueError:
            self.close()
            raise ConfigurationError("SUPABASE_URL is not an http(s) URL.") from None

    def __repr__(self) -> str:
        return f"SupabaseTokenStore(url={self._url!r})"

    def close(self) -> None:
        """Close the HTTP client if this store created it."""
        if self._owns_http_client:
            self._http.close()

    # --- the TokenStore protocol -------------------------------------------------

    def get(self, user_id: str) -> StoredGrant | None:
        query = self._table().select(SELECTED_COLUMNS).eq("user_id", user_id)
        return _single(self._send(query))

    def link(self, grant: NewGrant) -> StoredGrant:
        body = _rows.json_ready(_rows.link_columns(grant))
        query = self._table().upsert(body, on_conflict="user_id").select(SELECTED_COLUMNS)
        stored = _single(self._send(query))
        if stored is None:  # an upsert asked for its representation always returns it
            raise StorageUnavailable("Supabase returned no row for the linked grant.")
        return stored

    def update_tokens(self, user_id: str, expected_version: int, update: TokenUpdate) -> StoredGrant | None:
        body = _rows.json_ready(_rows.token_update_columns(update))
        query = (
            self._table()
            .update(body)
            .eq("user_id", user_id)
            .eq("version", expected_version)
            .eq("token_status", TokenStatus.ACTIVE.value)
            .select(SELECTED_COLUMNS)
        )
        return _single(self._send(query))

    def record_refresh_failure(self, user_id: str, expected_version: int, error_code: str) -> bool:
        # PostgREST cannot say "count = count + 1" in a PATCH. Reading the count and
        # writing count + 1 under the same version filter is still exact: any other
        # write in between gives the row a new version and this PATCH matches nothing.
        read = (
            self._table()
            .select("refresh_failure_count")
            .eq("user_id", user_id)
            .eq("version", expected_version)
            .eq("token_status", TokenStatus.ACTIVE.value)
        )
        rows = self._send(read)
        if not rows:
            return False
        body = {"refresh_failure_count": int(rows[0]["refresh_failure_count"]) + 1, "last_error_code": error_code}
        write = (
            self._table()
            .update(body)
            .eq("user_id", user_id)
            .eq("version", expected_version)
            .eq("token_status", TokenStatus.ACTIVE.value)
            .select("user_id")
        )
        return bool(self._send(write))

    def mark_expired(self, user_id: str, reason: str, expected_version: int | None = None) -> bool:
        query = self._table().update(_rows.json_ready(_rows.expired_columns(reason))).eq("user_id", user_id)
        if expected_version is not None:
            query = query.eq("version", expected_version)
        query = query.eq("token_status", TokenStatus.ACTIVE.value).select("user_id")
        return bool(self._send(query))

    def reencrypt(
        self,
        user_id: str,
        expected_version: int,
        access_token_encrypted: str | None,
        refresh_token_encrypted: str | None,
        encryption_key_id: str,
    ) -> bool:
        body = _rows.json_ready(
            _rows.reencrypt_columns(access_token_encrypted, refresh_token_encrypted, encryption_key_id)
        )
        # Any status: an expired row keeps its key id, and an old key can only be
        # dropped once no row at all names it.
        query = self._table().update(body).eq("user_id", user_id).eq("version", expected_version).select("user_id")
        return bool(self._send(query))

    def delete(self, user_id: str) -> bool:
        query = self._table().delete().eq("user_id", user_id).select("user_id")
        return bool(self._send(query))

    def list_due(self, before: datetime, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        query = (
            self._table()
            .select(SELECTED_COLUMNS)
            .eq("token_status", TokenStatus.ACTIVE.value)
            .lt("expires_at", _rows.iso_utc(before))
        )
        if after_user_id is not None:
            query = query.gt("user_id", after_user_id)
        query = query.order("user_id").limit(_rows.require_positive_limit(limit))
        return [_rows.grant_from_row(row) for row in self._send(query)]

    def list_not_under_key(self, key_id: str, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        query = self._table().select(SELECTED_COLUMNS).neq("encryption_key_id", key_id)
        if after_user_id is not None:
            query = query.gt("user_id", after_user_id)
        query = query.order("user_id").limit(_rows.require_positive_limit(limit))
        return [_rows.grant_from_row(row) for row in self._send(query)]

    def count_by_key_id(self) -> dict[str, int]:
        # PostgREST has no GROUP BY unless aggregate functions are enabled on the
        # project (db-aggregates-enabled), so the key ids are fetched page by page and
        # counted here. Keyset paging on user_id, not offsets: rows linked or deleted
        # meanwhile cannot make a page skip or repeat a row. Rotation runs this once a
        # month over one narrow column; the cost is a few requests per 1000 users.
        counts: dict[str, int] = {}
        after_user_id: str | None = None
        while True:
            query = self._table().select("user_id,encryption_key_id")
            if after_user_id is not None:
                query = query.gt("user_id", after_user_id)
            rows = self._send(query.order("user_id").limit(COUNT_PAGE_SIZE))
            if not rows:
                return counts
            for row in rows:
                key_id = str(row["encryption_key_id"])
                counts[key_id] = counts.get(key_id, 0) + 1
            after_user_id = str(rows[-1]["user_id"])

    # --- plumbing ------------------------------------------------------------------

    def _table(self) -> SyncRequestBuilder:
        return self._postgrest.from_(TABLE)

    def _send(self, query: SyncSelectRequestBuilder) -> list[dict[str, Any]]:
        """Send the request ``query`` describes and return PostgREST's rows.

        The request is sent here rather than through ``execute()``: that drops the
        HTTP status, which is what tells an outage (5xx) from a rejected write (4xx).
        """
        response = _transmit(query)
        if isinstance(response, StorageUnavailable):
            # Raised outside the except block on purpose: the httpx error holds the
            # request, whose headers hold the service-role key; it must not travel on
            # as this error's context.
            raise response
        if response.is_success:
            return _rows_in(response)
        raise _error_for(response)


def _transmit(query: SyncSelectRequestBuilder) -> httpx.Response | StorageUnavailable:
    try:
        return query.request.send(httpx.Headers())
    except httpx.TimeoutException as exc:
        logger.warning("supabase request timed out: %s", type(exc).__name__)
        return StorageUnavailable(f"Token storage (Supabase) timed out ({type(exc).__name__}).")
    except httpx.TransportError as exc:
        logger.warning("supabase request failed: %s", type(exc).__name__)
        return StorageUnavailable(f"Token storage (Supabase) is unreachable ({type(exc).__name__}).")


def _single(rows: list[dict[str, Any]]) -> StoredGrant | None:
    return _rows.grant_from_row(rows[0]) if rows else None


def _rows_in(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, list) or not all(isinstance(row, dict) for row in body):
        # A proxy page answered in PostgREST's place: not data we can trust.
        raise StorageUnavailable(f"Token storage (Supabase) answered {response.status_code} without rows.")
    return body


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _error_for(response: httpx.Response) -> Exception:
    """The store's error for a PostgREST error answer. Only the status and PostgREST's
    code are quoted: the body's details can echo row values (ciphertexts)."""
    status = response.status_code
    body = _error_body(response)
    code = body.get("code")
    code_text = str(code) if isinstance(code, str | int) and str(code) else str(status)
    logger.warning("supabase answered %s (%s)", status, code_text)
    if status >= 500:
        return StorageUnavailable(f"Token storage (Supabase) answered {status} ({code_text}).")
    if status in (401, 403):
        return ConfigurationError(
            f"Supabase refused the request ({status}, {code_text}): check SUPABASE_SERVICE_ROLE_KEY "
            "and the grants on the table."
        )
    if status == 404:
        return ConfigurationError(
            f"Supabase does not expose the {TABLE} table ({code_text}): check SUPABASE_URL and the migration."
        )
    message = body.get("message")
    return rejection(code_text, constraint_named_in(message if isinstance(message, str) else None))
