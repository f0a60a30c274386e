"""The exact PostgREST requests the Supabase store sends, and how it reads PostgREST's answers."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.support.fake_postgrest import RecordedRequest, ScriptedPostgrest, json_response, raising
from token_manager.errors import ConfigurationError, StorageUnavailable
from token_manager.models import NewGrant, TokenStatus, TokenUpdate
from token_manager.store import _rows
from token_manager.store.errors import StoreConflict, StoreRejected
from token_manager.store.supabase import SupabaseTokenStore

KEY = "sb-service-role-MARKER-61d0c9a7f3"
URL = "https://project-ref.supabase.test"
PATH = "/rest/v1/sonos_tokens"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ALL_COLUMNS = ",".join(_rows.GRANT_COLUMNS)
CHECK_VIOLATION_MESSAGE = 'new row for relation "sonos_tokens" violates check constraint "{}"'


def row(user_id: str = "u1", version: int = 4, **overrides: Any) -> dict[str, Any]:
    """A row as PostgREST renders it."""
    return {
        "user_id": user_id,
        "household_id": "Sonos_HH1",
        "household_ids": ["Sonos_HH1"],
        "access_token_encrypted": "ct-a",
        "refresh_token_encrypted": "ct-r",
        "encryption_key_id": "k1",
        "expires_at": "2030-01-01T12:00:00+00:00",
        "scope": "playback-control-all",
        "token_status": "active",
        "version": version,
        "refresh_failure_count": 0,
        "last_error_code": None,
        "last_refreshed_at": None,
        "created_at": "2026-12-01T10:00:00.123456+00:00",
        "updated_at": "2026-12-01T10:00:00.123456+00:00",
        **overrides,
    }


NEW_GRANT = NewGrant(
    user_id="u1",
    household_id="Sonos_HH1",
    household_ids=("Sonos_HH1",),
    access_token_encrypted="ct-a",
    refresh_token_encrypted="ct-r",
    encryption_key_id="k1",
    expires_at=T0,
    scope="playback-control-all",
)
UPDATE = TokenUpdate(
    access_token_encrypted="ct-a2",
    refresh_token_encrypted="ct-r2",
    encryption_key_id="k2",
    expires_at=T0 + timedelta(days=1),
)


class Harness:
    def __init__(self) -> None:
        self.postgrest = ScriptedPostgrest()
        self.client = httpx.Client(transport=self.postgrest.transport())
        self.store = SupabaseTokenStore(URL, KEY, http_client=self.client)

    def answer(self, *responses: httpx.Response) -> None:
        self.postgrest.queue(*responses)

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.postgrest.requests

    @property
    def only_request(self) -> RecordedRequest:
        assert len(self.requests) == 1, self.requests
        return self.requests[0]


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.client.close()


def assert_authenticated(request: RecordedRequest) -> None:
    assert request.apikey == KEY
    assert request.authorization == f"Bearer {KEY}"
    assert KEY not in request.raw_query


# --- one test per protocol method -------------------------------------------------


def test_get_sends_one_filtered_select(harness: Harness) -> None:
    harness.answer(json_response(200, [row()]))
    grant = harness.store.get("u1")

    request = harness.only_request
    assert (request.method, request.path) == ("GET", PATH)
    assert request.param("select") == ALL_COLUMNS
    assert request.filters == {"user_id": "eq.u1"}
    assert request.prefer is None
    assert request.body is None
    assert_authenticated(request)
    assert grant is not None
    assert grant.version == 4
    assert grant.created_at == datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)


def test_get_answers_none_for_an_empty_list(harness: Harness) -> None:
    assert harness.store.get("u1") is None


def test_link_upserts_on_user_id_merging_duplicates_with_every_column(harness: Harness) -> None:
    harness.answer(json_response(201, [row(version=9)]))
    stored = harness.store.link(NEW_GRANT)

    request = harness.only_request
    assert (request.method, request.path) == ("POST", PATH)
    assert request.param("on_conflict") == "user_id"
    assert request.param("select") == ALL_COLUMNS
    assert request.filters == {}
    assert request.prefer_set == {"return=representation", "resolution=merge-duplicates"}
    assert_authenticated(request)
    assert request.body == {
        "user_id": "u1",
        "household_id": "Sonos_HH1",
        "household_ids": ["Sonos_HH1"],
        "access_token_encrypted": "ct-a",
        "refresh_token_encrypted": "ct-r",
        "encryption_key_id": "k1",
        "expires_at": "2030-01-01T12:00:00Z",
        "scope": "playback-control-all",
        "token_status": "active",
        "refresh_failure_count": 0,
        "last_error_code": None,
        "last_refreshed_at": None,
    }
    assert "version" not in request.body  # the database's trigger owns versions
    assert stored.version == 9


def test_update_tokens_patches_only_the_read_version_of_an_active_grant(harness: Harness) -> None:
    harness.answer(json_response(200, [row(version=5)]))
    stored = harness.store.update_tokens("u1", 3, UPDATE)

    request = harness.only_request
    assert (request.method, request.path) == ("PATCH", PATH)
    assert request.filters == {"user_id": "eq.u1", "version": "eq.3", "token_status": "eq.active"}
    assert request.prefer == "return=representation"
    assert request.param("select") == ALL_COLUMNS
    assert request.body == {
        "access_token_encrypted": "ct-a2",
        "refresh_token_encrypted": "ct-r2",
        "encryption_key_id": "k2",
        "expires_at": "2030-01-02T12:00:00Z",
        "refresh_failure_count": 0,
        "last_error_code": None,
    }
    assert_authenticated(request)
    assert stored is not None
    assert stored.version == 5


def test_update_tokens_sends_scope_and_refresh_time_only_when_given(harness: Harness) -> None:
    harness.answer(json_response(200, [row()]))
    harness.store.update_tokens("u1", 3, TokenUpdate("a", "r", "k2", T0, scope="s2", last_refreshed_at=T0))
    body = harness.only_request.body
    assert body["scope"] == "s2"
    assert body["last_refreshed_at"] == "2030-01-01T12:00:00Z"


def test_update_tokens_reads_an_empty_list_as_a_lost_race(harness: Harness) -> None:
    harness.answer(json_response(200, []))
    assert harness.store.update_tokens("u1", 3, UPDATE) is None


def test_record_refresh_failure_reads_the_count_then_writes_count_plus_one_under_the_version(harness: Harness) -> None:
    harness.answer(json_response(200, [{"refresh_failure_count": 4}]), json_response(200, [{"user_id": "u1"}]))
    assert harness.store.record_refresh_failure("u1", 3, "upstream_unavailable")

    read, write = harness.requests
    assert (read.method, read.path) == ("GET", PATH)
    assert read.param("select") == "refresh_failure_count"
    assert read.filters == {"user_id": "eq.u1", "version": "eq.3", "token_status": "eq.active"}
    assert (write.method, write.path) == ("PATCH", PATH)
    assert write.filters == {"user_id": "eq.u1", "version": "eq.3", "token_status": "eq.active"}
    assert write.prefer == "return=representation"
    assert write.body == {"refresh_failure_count": 5, "last_error_code": "upstream_unavailable"}
    for request in (read, write):
        assert_authenticated(request)


def test_record_refresh_failure_stops_when_the_version_already_moved(harness: Harness) -> None:
    harness.answer(json_response(200, []))
    assert not harness.store.record_refresh_failure("u1", 3, "upstream_unavailable")
    assert len(harness.requests) == 1


def test_record_refresh_failure_reports_a_race_lost_between_read_and_write(harness: Harness) -> None:
    harness.answer(json_response(200, [{"refresh_failure_count": 0}]), json_response(200, []))
    assert not harness.store.record_refresh_failure("u1", 3, "upstream_unavailable")


def test_mark_expired_with_a_version_patches_only_that_active_version(harness: Harness) -> None:
    harness.answer(json_response(200, [{"user_id": "u1"}]))
    assert harness.store.mark_expired("u1", "invalid_grant", 7)

    request = harness.only_request
    assert (request.method, request.path) == ("PATCH", PATH)
    assert request.filters == {"user_id": "eq.u1", "version": "eq.7", "token_status": "eq.active"}
    assert request.prefer == "return=representation"
    assert request.body == {
        "token_status": "expired",
        "access_token_encrypted": None,
        "refresh_token_encrypted": None,
        "last_error_code": "invalid_grant",
    }
    assert_authenticated(request)


def test_mark_expired_without_a_version_still_requires_an_active_grant(harness: Harness) -> None:
    assert not harness.store.mark_expired("u1", "invalid_request")
    assert harness.only_request.filters == {"user_id": "eq.u1", "token_status": "eq.active"}


def test_reencrypt_patches_the_read_version_whatever_the_status(harness: Harness) -> None:
    harness.answer(json_response(200, [{"user_id": "u1"}]))
    assert harness.store.reencrypt("u1", 3, "ct-a-k2", None, "k2")

    request = harness.only_request
    assert (request.method, request.path) == ("PATCH", PATH)
    assert request.filters == {"user_id": "eq.u1", "version": "eq.3"}
    assert request.prefer == "return=representation"
    assert request.body == {
        "access_token_encrypted": "ct-a-k2",
        "refresh_token_encrypted": None,
        "encryption_key_id": "k2",
    }


def test_delete_sends_one_filtered_delete_and_reports_whether_a_row_went(harness: Harness) -> None:
    harness.answer(json_response(200, [{"user_id": "u1"}]), json_response(200, []))
    assert harness.store.delete("u1")
    assert not harness.store.delete("u1")

    request = harness.requests[0]
    assert (request.method, request.path) == ("DELETE", PATH)
    assert request.filters == {"user_id": "eq.u1"}
    assert request.prefer == "return=representation"
    assert not request.body  # postgrest sends "{}"; no row data either way
    assert_authenticated(request)


def test_list_due_filters_active_rows_before_the_cutoff_in_keyset_order(harness: Harness) -> None:
    harness.answer(json_response(200, [row("u3"), row("u4")]))
    cutoff = datetime(2030, 1, 1, 14, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    due = harness.store.list_due(cutoff, limit=50, after_user_id="u2")

    request = harness.only_request
    assert (request.method, request.path) == ("GET", PATH)
    assert request.filters == {
        "token_status": "eq.active",
        "expires_at": "lt.2030-01-01T13:00:00Z",
        "user_id": "gt.u2",
    }
    assert request.param("order") == "user_id.asc"
    assert request.param("limit") == "50"
    assert request.param("select") == ALL_COLUMNS
    # A "+00:00" offset would need escaping: PostgREST reads a bare "+" as a space.
    assert "%2B" not in request.raw_query
    assert "+" not in request.raw_query
    assert [grant.user_id for grant in due] == ["u3", "u4"]


def test_list_due_first_page_has_no_user_id_filter(harness: Harness) -> None:
    harness.store.list_due(T0, limit=10)
    assert "user_id" not in harness.only_request.filters


def test_list_not_under_key_filters_other_keys_in_keyset_order(harness: Harness) -> None:
    harness.answer(json_response(200, [row("b", encryption_key_id="k1")]))
    rows = harness.store.list_not_under_key("k2", limit=100, after_user_id="a")

    request = harness.only_request
    assert (request.method, request.path) == ("GET", PATH)
    assert request.filters == {"encryption_key_id": "neq.k2", "user_id": "gt.a"}
    assert request.param("order") == "user_id.asc"
    assert request.param("limit") == "100"
    assert [grant.encryption_key_id for grant in rows] == ["k1"]


def test_count_by_key_id_pages_by_user_id_until_an_empty_page(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("token_manager.store.supabase.COUNT_PAGE_SIZE", 2)
    harness.answer(
        json_response(200, [{"user_id": "a", "encryption_key_id": "k1"}, {"user_id": "b", "encryption_key_id": "k2"}]),
        # A short page is not the end: Supabase caps pages at max-rows without saying so.
        json_response(200, [{"user_id": "c", "encryption_key_id": "k1"}]),
        json_response(200, []),
    )
    assert harness.store.count_by_key_id() == {"k1": 2, "k2": 1}

    assert [request.filters for request in harness.requests] == [{}, {"user_id": "gt.b"}, {"user_id": "gt.c"}]
    for request in harness.requests:
        assert (request.method, request.path) == ("GET", PATH)
        assert request.param("select") == "user_id,encryption_key_id"
        assert request.param("order") == "user_id.asc"
        assert request.param("limit") == "2"


# --- answers that are not rows -----------------------------------------------------


def _exception_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error) + str(error)


STORE_CALLS: list[tuple[str, Callable[[SupabaseTokenStore], object]]] = [
    ("get", lambda store: store.get("u1")),
    ("link", lambda store: store.link(NEW_GRANT)),
    ("update_tokens", lambda store: store.update_tokens("u1", 3, UPDATE)),
    ("record_refresh_failure", lambda store: store.record_refresh_failure("u1", 3, "e")),
    ("mark_expired", lambda store: store.mark_expired("u1", "invalid_grant", 3)),
    ("reencrypt", lambda store: store.reencrypt("u1", 3, "a", "r", "k2")),
    ("delete", lambda store: store.delete("u1")),
    ("list_due", lambda store: store.list_due(T0, limit=5)),
    ("list_not_under_key", lambda store: store.list_not_under_key("k1", limit=5)),
    ("count_by_key_id", lambda store: store.count_by_key_id()),
]


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(lambda request: httpx.ConnectError("connection refused", request=request), id="connect-error"),
        pytest.param(lambda request: httpx.ReadTimeout("timed out", request=request), id="read-timeout"),
        pytest.param(lambda request: httpx.ConnectTimeout("timed out", request=request), id="connect-timeout"),
        pytest.param(lambda request: httpx.RemoteProtocolError("reset", request=request), id="connection-reset"),
    ],
)
@pytest.mark.parametrize(("method", "call"), STORE_CALLS, ids=[name for name, _ in STORE_CALLS])
def test_transport_failures_raise_storage_unavailable_without_the_key(
    make_error: Callable[[httpx.Request], Exception],
    method: str,
    call: Callable[[SupabaseTokenStore], object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with httpx.Client(transport=raising(make_error)) as client:
        store = SupabaseTokenStore(URL, KEY, http_client=client)
        with pytest.raises(StorageUnavailable) as caught:
            call(store)
    assert caught.value.retryable
    assert caught.value.__context__ is None  # the httpx error carries the request headers
    assert KEY not in _exception_text(caught.value)
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("response", "expected", "code"),
    [
        pytest.param(httpx.Response(503, text="<html>upstream down</html>"), StorageUnavailable, "503", id="503-html"),
        pytest.param(
            json_response(500, {"code": "XX000", "message": "internal"}), StorageUnavailable, "XX000", id="500"
        ),
        pytest.param(
            json_response(503, {"code": "PGRST001", "message": "Database client error"}),
            StorageUnavailable,
            "PGRST001",
            id="503-pgrst001",
        ),
        pytest.param(
            json_response(504, {"code": "PGRST003", "message": "Timed out acquiring connection"}),
            StorageUnavailable,
            "PGRST003",
            id="504",
        ),
        pytest.param(json_response(401, {"message": "Invalid API key"}), ConfigurationError, "401", id="401-bad-key"),
        pytest.param(
            json_response(403, {"code": "42501", "message": "permission denied for table sonos_tokens"}),
            ConfigurationError,
            "42501",
            id="403-no-grant",
        ),
        pytest.param(
            json_response(404, {"code": "PGRST205", "message": "Could not find the table"}),
            ConfigurationError,
            "PGRST205",
            id="404-no-table",
        ),
        pytest.param(
            json_response(
                409,
                {
                    "code": "23505",
                    "message": 'duplicate key value violates unique constraint "sonos_tokens_pkey"',
                    "details": "Key (user_id)=(u1) already exists.",
                },
            ),
            StoreConflict,
            "23505",
            id="409-unique",
        ),
        pytest.param(
            json_response(
                400,
                {
                    "code": "23514",
                    "message": CHECK_VIOLATION_MESSAGE.format("sonos_tokens_key_id_present"),
                    "details": "Failing row contains (u1, ct-MARKER-row-value, ...).",
                },
            ),
            StoreRejected,
            "23514",
            id="400-check",
        ),
        pytest.param(
            json_response(400, {"code": "PGRST204", "message": "Could not find the 'x' column"}),
            StoreRejected,
            "PGRST204",
            id="400-unknown-column",
        ),
        pytest.param(httpx.Response(200, text="<html>captive portal</html>"), StorageUnavailable, "200", id="200-html"),
        pytest.param(json_response(200, {"not": "a list"}), StorageUnavailable, "200", id="200-object"),
    ],
)
def test_error_answers_map_to_clear_errors_naming_the_code_never_the_key(
    harness: Harness,
    response: httpx.Response,
    expected: type[Exception],
    code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    harness.answer(response)
    with pytest.raises(expected) as caught:
        harness.store.get("u1")

    assert code in str(caught.value)
    text = _exception_text(caught.value)
    assert KEY not in text
    assert "ct-MARKER" not in text
    assert KEY not in caplog.text
    if isinstance(caught.value, StoreRejected):
        assert caught.value.error_code == code


def test_a_check_violation_names_the_constraint(harness: Harness) -> None:
    harness.answer(
        json_response(
            400,
            {
                "code": "23514",
                "message": CHECK_VIOLATION_MESSAGE.format("sonos_tokens_active_has_tokens"),
            },
        )
    )
    with pytest.raises(StoreRejected) as caught:
        harness.store.reencrypt("u1", 3, None, None, "k2")
    assert caught.value.constraint == "sonos_tokens_active_has_tokens"
    assert not isinstance(caught.value, StoreConflict)


def test_an_outage_is_not_retried_inside_the_store(harness: Harness) -> None:
    # postgrest's own retry sleeps for seconds; the caller owns retry policy.
    harness.answer(httpx.Response(503, text="down"))
    with pytest.raises(StorageUnavailable):
        harness.store.get("u1")
    assert len(harness.requests) == 1


# --- construction ------------------------------------------------------------------


def test_repr_shows_the_url_but_not_the_key(harness: Harness) -> None:
    assert URL in repr(harness.store)
    assert KEY not in repr(harness.store)
    assert KEY not in str(harness.store)


def test_a_trailing_slash_in_the_url_does_not_double_the_path(harness: Harness) -> None:
    with httpx.Client(transport=harness.postgrest.transport()) as client:
        SupabaseTokenStore(URL + "/", KEY, http_client=client).get("u1")
    assert harness.only_request.path == PATH


def test_an_empty_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SUPABASE_SERVICE_ROLE_KEY"):
        SupabaseTokenStore(URL, "  ")


def test_a_url_that_is_not_http_is_a_configuration_error_without_the_key() -> None:
    with pytest.raises(ConfigurationError, match="SUPABASE_URL") as caught:
        SupabaseTokenStore("project-ref.supabase.test", KEY)
    assert KEY not in _exception_text(caught.value)


def test_close_leaves_a_callers_client_open_and_closes_its_own() -> None:
    with httpx.Client(transport=ScriptedPostgrest().transport()) as callers:
        store = SupabaseTokenStore(URL, KEY, http_client=callers)
        store.close()
        assert not callers.is_closed
        store.get("u1")  # still usable

    own = SupabaseTokenStore(URL, KEY, timeout=2.5)
    client = own._http
    assert client.timeout == httpx.Timeout(2.5)
    own.close()
    assert client.is_closed


def test_rows_are_read_in_utc_whatever_offset_postgrest_renders(harness: Harness) -> None:
    harness.answer(json_response(200, [row(expires_at="2030-01-02T01:45:00+13:45")]))
    grant = harness.store.get("u1")
    assert grant is not None
    assert grant.expires_at == T0
    assert grant.expires_at is not None
    assert grant.expires_at.tzinfo is UTC
    assert grant.token_status is TokenStatus.ACTIVE
