"""A PostgREST stand-in for httpx.MockTransport: records every request and answers from a real Postgres.

``FakePostgrest`` translates the handful of PostgREST features the Supabase store uses
(``eq``/``neq``/``lt``/``lte``/``gt``/``gte``/``is`` filters, ``select``, ``order``,
``limit``, ``offset``, ``on_conflict`` with ``resolution=merge-duplicates`` or
``ignore-duplicates``, ``Prefer: return=representation``) into SQL against the same
database the Postgres store uses, as role ``service_role``, and shapes the answer the
way PostgREST does: rows as ``json_agg`` renders them, ``[]`` for a filter that matched
nothing, and Postgres errors as ``{"code", "message", "details", "hint"}`` with
PostgREST's status (409 for 23505, 400 for 23514, ...). Anything it does not know it
refuses with 400, so a store that starts sending something new fails loudly.

``ScriptedPostgrest`` records requests the same way but answers canned responses, for
unit tests that pin the exact requests without a database.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from psycopg import sql

TABLE = "sonos_tokens"
REST_PREFIX = "/rest/v1/"
_RESERVED_PARAMS = frozenset({"select", "order", "limit", "offset", "on_conflict", "columns"})
_OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the store sent it."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...]
    raw_query: str
    prefer: str | None
    apikey: str | None
    authorization: str | None
    body: Any

    def param(self, name: str) -> str | None:
        values = [value for key, value in self.params if key == name]
        assert len(values) <= 1, f"{name} appears {len(values)} times in {self.params}"
        return values[0] if values else None

    @property
    def filter_pairs(self) -> tuple[tuple[str, str], ...]:
        """Column filters in order (``version=eq.3`` → ``("version", "eq.3")``), reserved params left out."""
        return tuple((key, value) for key, value in self.params if key not in _RESERVED_PARAMS)

    @property
    def filters(self) -> dict[str, str]:
        pairs = self.filter_pairs
        assert len({key for key, _ in pairs}) == len(pairs), f"a column is filtered twice: {pairs}"
        return dict(pairs)

    @property
    def prefer_set(self) -> frozenset[str]:
        return frozenset(part.strip() for part in (self.prefer or "").split(",") if part.strip())


def record(request: httpx.Request) -> RecordedRequest:
    content = request.read()
    return RecordedRequest(
        method=request.method,
        path=request.url.path,
        params=tuple(request.url.params.multi_items()),
        raw_query=request.url.query.decode("ascii"),
        prefer=request.headers.get("Prefer"),
        apikey=request.headers.get("apikey"),
        authorization=request.headers.get("Authorization"),
        body=json.loads(content) if content else None,
    )


def json_response(status: int, body: object | None = None) -> httpx.Response:
    if body is None:
        return httpx.Response(status)
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


class ScriptedPostgrest:
    """Records each request and answers the next canned response (``[]`` when none is left)."""

    def __init__(self, responses: Iterable[httpx.Response] = ()) -> None:
        self.requests: list[RecordedRequest] = []
        self._responses = list(responses)

    def queue(self, *responses: httpx.Response) -> None:
        """Answer the next requests with ``responses``, in order."""
        self._responses.extend(responses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(record(request))
        return self._responses.pop(0) if self._responses else json_response(200, [])

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def raising(make_error: Callable[[httpx.Request], Exception]) -> httpx.MockTransport:
    """A transport whose every request fails the way ``make_error`` says (e.g. ConnectError)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise make_error(request)

    return httpx.MockTransport(handler)


class _Refused(Exception):
    """A request PostgREST itself would refuse before reaching the database."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body


class FakePostgrest:
    """PostgREST for ``sonos_tokens`` over a real database; see the module docstring."""

    def __init__(self, database_url: str, service_role_key: str, *, time_zone: str = "UTC") -> None:
        self.requests: list[RecordedRequest] = []
        self._service_role_key = service_role_key
        self._lock = threading.Lock()
        self._connection = psycopg.connect(database_url, autocommit=True)
        # What Supabase does for a service-role JWT: run as service_role (BYPASSRLS,
        # only the grants the migration gives it).
        self._connection.execute("set role service_role")
        # PostgREST renders timestamptz in the database's zone; a non-UTC one proves
        # the store normalises what it reads.
        self._connection.execute(sql.SQL("set timezone to {}").format(sql.Literal(time_zone)))
        rows = self._connection.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = %s::regclass and attnum > 0 and not attisdropped",
            (f"public.{TABLE}",),
        ).fetchall()
        self._column_types: dict[str, str] = {name: type_name for name, type_name in rows}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def close(self) -> None:
        self._connection.close()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        recorded = record(request)
        with self._lock:
            self.requests.append(recorded)
            if (
                recorded.apikey != self._service_role_key
                or recorded.authorization != f"Bearer {self._service_role_key}"
            ):
                return json_response(401, {"message": "Invalid API key"})
            try:
                return self._answer(recorded)
            except _Refused as refused:
                return json_response(refused.status, refused.body)
            except psycopg.Error as exc:
                return self._database_error(exc)

    # --- request → SQL -----------------------------------------------------------------

    def _answer(self, request: RecordedRequest) -> httpx.Response:
        if not request.path.startswith(REST_PREFIX):
            raise _Refused(404, {"message": "no route"})
        table = request.path.removeprefix(REST_PREFIX)
        if table != TABLE:
            raise _Refused(
                404, {"code": "PGRST205", "message": f"Could not find the table 'public.{table}' in the schema cache"}
            )
        where, where_params = self._where(request)
        representation = "return=representation" in request.prefer_set
        if request.method == "GET":
            query = sql.SQL("select {columns} from {table} {where} {order} {limit}").format(
                columns=self._select(request),
                table=sql.Identifier(TABLE),
                where=where,
                order=self._order(request),
                limit=self._limit_offset(request),
            )
            return json_response(200, self._rows_json(query, where_params))
        if request.method == "PATCH":
            if not isinstance(request.body, dict) or not request.body:
                raise _Refused(400, {"code": "PGRST102", "message": "Empty or invalid json"})
            assignments, values = self._values(request.body)
            change = sql.SQL("update {table} set {assignments} {where} returning *").format(
                table=sql.Identifier(TABLE),
                assignments=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(name), value) for name, value in assignments
                ),
                where=where,
            )
            return self._write(request, change, values + where_params, status=200, representation=representation)
        if request.method == "DELETE":
            change = sql.SQL("delete from {table} {where} returning *").format(table=sql.Identifier(TABLE), where=where)
            return self._write(request, change, where_params, status=200, representation=representation)
        if request.method == "POST":
            if where_params:
                raise _Refused(400, {"code": "PGRST100", "message": "filters are not allowed on insert"})
            change, values = self._insert(request)
            return self._write(request, change, values, status=201, representation=representation)
        raise _Refused(405, {"message": f"method {request.method} is not supported by this fake"})

    def _write(
        self, request: RecordedRequest, change: sql.Composed, params: list[Any], *, status: int, representation: bool
    ) -> httpx.Response:
        # The shape PostgREST itself runs: the write in a CTE, json_agg over its rows.
        selected = sql.SQL("select {columns} from pgrst_source").format(columns=self._select(request))
        rows = self._rows_json(selected, params, source=change)
        if not representation:
            return httpx.Response(204 if status == 200 else status)
        return json_response(status, rows)

    def _rows_json(self, query: sql.Composed, params: list[Any], *, source: sql.Composed | None = None) -> list[Any]:
        wrapped = sql.SQL("select coalesce(json_agg(pgrst_row), '[]')::text from ({query}) pgrst_row").format(
            query=query
        )
        if source is not None:
            wrapped = sql.SQL("with pgrst_source as ({source}) {wrapped}").format(source=source, wrapped=wrapped)
        row = self._connection.execute(wrapped, params).fetchone()
        assert row is not None
        rows: list[Any] = json.loads(row[0])
        return rows

    def _column(self, name: str) -> str:
        if name not in self._column_types:
            raise _Refused(400, {"code": "42703", "message": f"column {TABLE}.{name} does not exist"})
        return name

    def _cast(self, name: str) -> sql.Composable:
        return sql.SQL("cast(%s as {type})").format(type=sql.SQL(self._column_types[self._column(name)]))

    def _select(self, request: RecordedRequest) -> sql.Composable:
        selected = request.param("select")
        if selected is None or selected == "*":
            return sql.SQL("*")
        return sql.SQL(", ").join(sql.Identifier(self._column(name.strip())) for name in selected.split(","))

    def _where(self, request: RecordedRequest) -> tuple[sql.Composable, list[Any]]:
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        for column, expression in request.filter_pairs:
            operator, _, value = expression.partition(".")
            if operator == "is" and value == "null":
                conditions.append(sql.SQL("{} is null").format(sql.Identifier(self._column(column))))
            elif operator in _OPERATORS:
                conditions.append(
                    sql.SQL("{} {} {}").format(
                        sql.Identifier(self._column(column)), sql.SQL(_OPERATORS[operator]), self._cast(column)
                    )
                )
                params.append(value)
            else:
                raise _Refused(400, {"code": "PGRST100", "message": f"failed to parse filter ({expression})"})
        if not conditions:
            return sql.SQL(""), params
        return sql.SQL("where {}").format(sql.SQL(" and ").join(conditions)), params

    def _order(self, request: RecordedRequest) -> sql.Composable:
        order = request.param("order")
        if order is None:
            return sql.SQL("")
        terms: list[sql.Composable] = []
        for term in order.split(","):
            column, *modifiers = term.split(".")
            direction = {"asc": "asc", "desc": "desc"}
            nulls = {"nullsfirst": "nulls first", "nullslast": "nulls last"}
            words = [direction.get(m) or nulls.get(m) for m in modifiers]
            if None in words:
                raise _Refused(400, {"code": "PGRST100", "message": f"failed to parse order ({term})"})
            terms.append(
                sql.SQL("{} {}").format(sql.Identifier(self._column(column)), sql.SQL(" ".join(filter(None, words))))
            )
        return sql.SQL("order by {}").format(sql.SQL(", ").join(terms))

    def _limit_offset(self, request: RecordedRequest) -> sql.Composable:
        parts: list[sql.Composable] = []
        for name in ("limit", "offset"):
            raw = request.param(name)
            if raw is None:
                continue
            if not raw.isdigit():
                raise _Refused(400, {"code": "PGRST100", "message": f"failed to parse {name} ({raw})"})
            parts.append(sql.SQL(f"{name} {{}}").format(sql.Literal(int(raw))))
        return sql.SQL(" ").join(parts)

    def _values(self, row: dict[str, Any]) -> tuple[list[tuple[str, sql.Composable]], list[Any]]:
        return [(name, self._cast(name)) for name in row], list(row.values())

    def _insert(self, request: RecordedRequest) -> tuple[sql.Composed, list[Any]]:
        rows = request.body if isinstance(request.body, list) else [request.body]
        if not rows or not all(isinstance(row, dict) and row for row in rows):
            raise _Refused(400, {"code": "PGRST102", "message": "Empty or invalid json"})
        names = list(dict.fromkeys(name for row in rows for name in row))
        params: list[Any] = []
        tuples: list[sql.Composable] = []
        for row in rows:
            tuples.append(sql.SQL("({})").format(sql.SQL(", ").join(self._cast(name) for name in names)))
            params.extend(row.get(name) for name in names)
        insert = sql.SQL("insert into {table} ({names}) values {tuples}").format(
            table=sql.Identifier(TABLE),
            names=sql.SQL(", ").join(sql.Identifier(self._column(name)) for name in names),
            tuples=sql.SQL(", ").join(tuples),
        )
        resolution = {part for part in request.prefer_set if part.startswith("resolution=")}
        target = sql.SQL(", ").join(
            sql.Identifier(self._column(name)) for name in (request.param("on_conflict") or "user_id").split(",")
        )
        if "resolution=merge-duplicates" in resolution:
            updates = sql.SQL(", ").join(
                sql.SQL("{name} = excluded.{name}").format(name=sql.Identifier(n)) for n in names
            )
            insert = sql.SQL("{insert} on conflict ({target}) do update set {updates}").format(
                insert=insert, target=target, updates=updates
            )
        elif "resolution=ignore-duplicates" in resolution:
            insert = sql.SQL("{insert} on conflict ({target}) do nothing").format(insert=insert, target=target)
        return sql.SQL("{insert} returning *").format(insert=insert), params

    # --- Postgres error → PostgREST answer ------------------------------------------

    @staticmethod
    def _database_error(exc: psycopg.Error) -> httpx.Response:
        sqlstate = exc.sqlstate or "XX000"
        body = {
            "code": sqlstate,
            "message": exc.diag.message_primary,
            "details": exc.diag.message_detail,
            "hint": exc.diag.message_hint,
        }
        return json_response(postgrest_status(sqlstate), body)


def postgrest_status(sqlstate: str) -> int:
    """PostgREST's HTTP status for a Postgres error (its documented table, abridged)."""
    exact = {"23503": 409, "23505": 409, "42501": 403, "42P01": 404, "42883": 404, "P0001": 400}
    if sqlstate in exact:
        return exact[sqlstate]
    by_class = {"08": 503, "53": 503, "0L": 403, "0P": 403, "28": 403}
    server_side = {"09", "25", "2D", "38", "39", "3B", "40", "54", "55", "57", "58", "XX", "P0"}
    prefix = sqlstate[:2]
    if prefix in by_class:
        return by_class[prefix]
    return 500 if prefix in server_side else 400
