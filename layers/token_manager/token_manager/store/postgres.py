"""The grant store over a direct Postgres connection (psycopg 3), for DATABASE_URL and local runs."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from token_manager.errors import ConfigurationError, StorageUnavailable
from token_manager.models import NewGrant, StoredGrant, TokenStatus, TokenUpdate
from token_manager.store import _rows
from token_manager.store.base import TABLE
from token_manager.store.errors import rejection

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    Connection = psycopg.Connection[dict[str, Any]]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that say "the database would refuse this however often it is asked" because the
# schema or the role is wrong: undefined table, undefined column, insufficient privilege.
_CONFIGURATION_SQLSTATES = frozenset({"42P01", "42703", "42501"})


class PostgresTokenStore:
    """Grants in ``sonos_tokens`` over one autocommit psycopg connection.

    The connection opens on first use (a Lambda that never touches the store pays
    nothing) and is shared by the refresher's worker threads behind a lock. A
    connection the server dropped while the container was frozen is replaced once per
    call; anything else the backing service does wrong raises ``StorageUnavailable``.
    Versions come from the table's trigger: every statement filters on the version the
    caller read and returns the row's new one.

    >>> store = PostgresTokenStore("postgresql://service@db.internal:5432/postgres")
    >>> store.get("user-1") is None
    True
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        # libpq takes whole seconds and treats anything below 2 as 2; rounding down
        # could turn 0.5 into 0, which means "wait forever".
        self._connect_timeout_seconds = max(2, math.ceil(connect_timeout))
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    def __repr__(self) -> str:
        # The DSN carries the password: it appears in no repr, message or log.
        return "PostgresTokenStore()"

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        with self._lock:
            self._discard_connection()

    # --- the TokenStore protocol -------------------------------------------------

    def get(self, user_id: str) -> StoredGrant | None:
        from psycopg import sql

        query = sql.SQL("select {columns} from {table} where user_id = %(where_user_id)s").format(
            columns=_selected_columns(), table=sql.Identifier(TABLE)
        )
        return self._fetch_one(query, {"where_user_id": user_id})

    def link(self, grant: NewGrant) -> StoredGrant:
        from psycopg import sql

        columns = _rows.link_columns(grant)
        replaced = [name for name in columns if name != "user_id"]
        query = sql.SQL(
            "insert into {table} ({names}) values ({values}) on conflict (user_id) do update set {replacements}"
            " returning {columns}"
        ).format(
            table=sql.Identifier(TABLE),
            names=sql.SQL(", ").join(sql.Identifier(name) for name in columns),
            values=sql.SQL(", ").join(sql.Placeholder(name) for name in columns),
            replacements=sql.SQL(", ").join(
                sql.SQL("{name} = excluded.{name}").format(name=sql.Identifier(name)) for name in replaced
            ),
            columns=_selected_columns(),
        )
        stored = self._fetch_one(query, columns)
        if stored is None:  # an upsert with RETURNING always yields its row
            raise StorageUnavailable("Postgres returned no row for the linked grant.")
        return stored

    def update_tokens(self, user_id: str, expected_version: int, update: TokenUpdate) -> StoredGrant | None:
        columns = _rows.token_update_columns(update)
        query = _conditional_update(columns, active_only=True, returning=_selected_columns())
        return self._fetch_one(query, {**columns, **_version_filter(user_id, expected_version)})

    def record_refresh_failure(self, user_id: str, expected_version: int, error_code: str) -> bool:
        from psycopg import sql

        query = sql.SQL(
            "update {table} set refresh_failure_count = refresh_failure_count + 1, last_error_code = %(error_code)s"
            " where user_id = %(where_user_id)s and version = %(where_version)s and token_status = %(where_status)s"
        ).format(table=sql.Identifier(TABLE))
        params = {
            "error_code": error_code,
            "where_status": TokenStatus.ACTIVE.value,
            **_version_filter(user_id, expected_version),
        }
        return self._execute_changed(query, params)

    def mark_expired(self, user_id: str, reason: str, expected_version: int | None = None) -> bool:
        columns = _rows.expired_columns(reason)
        query = _conditional_update(columns, active_only=True, match_version=expected_version is not None)
        params: dict[str, Any] = {**columns, "where_user_id": user_id, "where_version": expected_version}
        return self._execute_changed(query, params)

    def reencrypt(
        self,
        user_id: str,
        expected_version: int,
        access_token_encrypted: str | None,
        refresh_token_encrypted: str | None,
        encryption_key_id: str,
    ) -> bool:
        columns = _rows.reencrypt_columns(access_token_encrypted, refresh_token_encrypted, encryption_key_id)
        # Any status: an expired row keeps its key id, and an old key can only be
        # dropped once no row at all names it.
        query = _conditional_update(columns, active_only=False)
        return self._execute_changed(query, {**columns, **_version_filter(user_id, expected_version)})

    def delete(self, user_id: str) -> bool:
        from psycopg import sql

        query = sql.SQL("delete from {table} where user_id = %(where_user_id)s").format(table=sql.Identifier(TABLE))
        return self._execute_changed(query, {"where_user_id": user_id})

    def list_due(self, before: datetime, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        from psycopg import sql

        condition = sql.SQL("token_status = %(where_status)s and expires_at < %(where_before)s")
        params = {"where_status": TokenStatus.ACTIVE.value, "where_before": _rows.utc(before)}
        return self._fetch_page(condition, params, limit, after_user_id)

    def list_not_under_key(self, key_id: str, limit: int, after_user_id: str | None = None) -> Sequence[StoredGrant]:
        from psycopg import sql

        condition = sql.SQL("encryption_key_id <> %(where_key_id)s")
        return self._fetch_page(condition, {"where_key_id": key_id}, limit, after_user_id)

    def count_by_key_id(self) -> dict[str, int]:
        from psycopg import sql

        query = sql.SQL(
            "select encryption_key_id, count(*) as row_count from {table} group by encryption_key_id"
        ).format(table=sql.Identifier(TABLE))

        def run(connection: Connection) -> dict[str, int]:
            rows = connection.execute(query).fetchall()
            return {str(row["encryption_key_id"]): int(row["row_count"]) for row in rows}

        return self._run(run)

    # --- plumbing ------------------------------------------------------------------

    def _fetch_page(
        self, condition: sql.Composable, params: dict[str, Any], limit: int, after_user_id: str | None
    ) -> list[StoredGrant]:
        from psycopg import sql

        if after_user_id is not None:
            condition = sql.SQL("{condition} and user_id > %(where_after_user_id)s").format(condition=condition)
            params = {**params, "where_after_user_id": after_user_id}
        query = sql.SQL("select {columns} from {table} where {condition} order by user_id limit %(limit)s").format(
            columns=_selected_columns(), table=sql.Identifier(TABLE), condition=condition
        )
        params = {**params, "limit": _rows.require_positive_limit(limit)}

        def run(connection: Connection) -> list[StoredGrant]:
            return [_rows.grant_from_row(row) for row in connection.execute(query, params).fetchall()]

        return self._run(run)

    def _fetch_one(self, query: sql.Composed, params: dict[str, Any]) -> StoredGrant | None:
        def run(connection: Connection) -> StoredGrant | None:
            row = connection.execute(query, params).fetchone()
            return None if row is None else _rows.grant_from_row(row)

        return self._run(run)

    def _execute_changed(self, query: sql.Composed, params: dict[str, Any]) -> bool:
        def run(connection: Connection) -> bool:
            changed: int = connection.execute(query, params).rowcount
            return changed > 0

        return self._run(run)

    def _run(self, operation: Callable[[Connection], T]) -> T:
        """Run ``operation`` on the shared connection, reconnecting once if it broke."""
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                connection = self._open_connection()
                try:
                    return operation(connection)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    broken = connection.closed or connection.broken
                    if broken:
                        self._discard_connection()
                    if broken and attempt == 1:
                        # Typically the server closed an idle connection while the Lambda
                        # was frozen: the statement never ran, so one retry is safe.
                        logger.info("postgres connection was broken (%s); reconnecting once", type(exc).__name__)
                        continue
                    logger.warning("postgres query failed: %s", type(exc).__name__)
                    raise StorageUnavailable("Token storage (Postgres) failed to answer.") from exc
                except psycopg.Error as exc:
                    translated = _translated(exc)
                    if translated is exc:
                        raise
                    raise translated from exc
            raise AssertionError("unreachable: the second attempt returns or raises")

    def _open_connection(self) -> Connection:
        import psycopg
        from psycopg.rows import dict_row

        if self._connection is not None and not self._connection.closed:
            return self._connection
        try:
            self._connection = psycopg.Connection.connect(
                self._dsn,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=self._connect_timeout_seconds,
                # None: no server-side prepared statements, which a transaction-mode
                # pooler (Supabase's port 6543) cannot keep across transactions.
                prepare_threshold=None,
                application_name="sonos-token-service",
            )
        except psycopg.ProgrammingError:
            # A malformed DSN: psycopg's message quotes it, password included.
            raise ConfigurationError("DATABASE_URL is not a valid Postgres connection string.") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            logger.warning("postgres connection failed: %s", type(exc).__name__)
            raise StorageUnavailable("Token storage (Postgres) is unreachable.") from exc
        return self._connection

    def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _selected_columns() -> sql.Composable:
    from psycopg import sql

    return sql.SQL(", ").join(sql.Identifier(name) for name in _rows.GRANT_COLUMNS)


def _version_filter(user_id: str, expected_version: int) -> dict[str, Any]:
    return {"where_user_id": user_id, "where_version": expected_version}


def _conditional_update(
    columns: _rows.Columns,
    *,
    active_only: bool,
    match_version: bool = True,
    returning: sql.Composable | None = None,
) -> sql.Composed:
    """``update sonos_tokens set <columns> where user_id = … [and version = …] [and active]``."""
    from psycopg import sql

    conditions: list[sql.Composable] = [sql.SQL("user_id = %(where_user_id)s")]
    if match_version:
        conditions.append(sql.SQL("version = %(where_version)s"))
    if active_only:
        conditions.append(sql.SQL("token_status = {active}").format(active=sql.Literal(TokenStatus.ACTIVE.value)))
    query = sql.SQL("update {table} set {assignments} where {conditions}").format(
        table=sql.Identifier(TABLE),
        assignments=sql.SQL(", ").join(
            sql.SQL("{name} = {value}").format(name=sql.Identifier(name), value=sql.Placeholder(name))
            for name in columns
        ),
        conditions=sql.SQL(" and ").join(conditions),
    )
    if returning is not None:
        query = sql.SQL("{query} returning {columns}").format(query=query, columns=returning)
    return query


def _translated(exc: Exception) -> Exception:
    """The store's error for a database error that is not an outage."""
    import psycopg

    if not isinstance(exc, psycopg.Error):
        return exc
    sqlstate = exc.sqlstate or "unknown"
    if isinstance(exc, psycopg.IntegrityError | psycopg.DataError):
        return rejection(sqlstate, exc.diag.constraint_name)
    if sqlstate in _CONFIGURATION_SQLSTATES:
        return ConfigurationError(
            f"Postgres refused the {TABLE} table ({sqlstate}): check that the migration is applied "
            "and the role may use it."
        )
    return exc
