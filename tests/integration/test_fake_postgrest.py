"""The PostgREST stand-in answers the way PostgREST does, so the contract suite can trust it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.fake_postgrest import FakePostgrest

pytestmark = pytest.mark.integration

KEY = "fake-service-role-MARKER-77aa"
BASE = "https://project-ref.supabase.test/rest/v1"
AUTH = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}
REPRESENTATION = {**AUTH, "Prefer": "return=representation"}
ROW = {
    "user_id": "u1",
    "household_id": "Sonos_HH1",
    "household_ids": ["Sonos_HH1"],
    "access_token_encrypted": "ct-a",
    "refresh_token_encrypted": "ct-r",
    "encryption_key_id": "k1",
    "expires_at": "2030-01-01T12:00:00Z",
}


@pytest.fixture
def client(database_url: str) -> Iterator[httpx.Client]:
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("truncate sonos_tokens")
    fake = FakePostgrest(database_url, KEY)
    with httpx.Client(base_url=BASE, transport=fake.transport()) as made:
        yield made
    fake.close()


def insert(client: httpx.Client, **overrides: Any) -> httpx.Response:
    return client.post("/sonos_tokens", json={**ROW, **overrides}, headers=REPRESENTATION)


def test_insert_answers_201_with_the_row_and_its_trigger_version(client: httpx.Client) -> None:
    response = insert(client)
    assert response.status_code == 201
    [row] = response.json()
    assert row["user_id"] == "u1"
    assert row["version"] >= 1
    assert row["token_status"] == "active"


def test_a_duplicate_insert_answers_409_with_code_23505(client: httpx.Client) -> None:
    insert(client)
    response = insert(client)
    assert response.status_code == 409
    assert response.json()["code"] == "23505"


def test_a_check_violation_answers_400_with_code_23514(client: httpx.Client) -> None:
    response = insert(client, household_id="Sonos_OTHER")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "23514"
    assert "sonos_tokens_household_ids_contain_primary" in body["message"]


def test_a_conditional_patch_that_matches_nothing_answers_an_empty_list(client: httpx.Client) -> None:
    version = insert(client).json()[0]["version"]
    response = client.patch(
        "/sonos_tokens",
        params={"user_id": "eq.u1", "version": f"eq.{version + 100}"},
        json={"scope": "x"},
        headers=REPRESENTATION,
    )
    assert (response.status_code, response.json()) == (200, [])


def test_an_upsert_merging_duplicates_replaces_the_row_with_a_new_version(client: httpx.Client) -> None:
    first = insert(client).json()[0]
    response = client.post(
        "/sonos_tokens",
        params={"on_conflict": "user_id"},
        json={**ROW, "access_token_encrypted": "ct-a2"},
        headers={**AUTH, "Prefer": "return=representation,resolution=merge-duplicates"},
    )
    assert response.status_code == 201
    [second] = response.json()
    assert second["access_token_encrypted"] == "ct-a2"
    assert second["version"] > first["version"]


def test_minimal_return_answers_without_a_body(client: httpx.Client) -> None:
    created = client.post("/sonos_tokens", json=ROW, headers={**AUTH, "Prefer": "return=minimal"})
    deleted = client.delete("/sonos_tokens", params={"user_id": "eq.u1"}, headers=AUTH)
    assert (created.status_code, created.content) == (201, b"")
    assert (deleted.status_code, deleted.content) == (204, b"")


def test_filters_order_and_limit_select_like_postgrest(client: httpx.Client) -> None:
    for user_id in ("c", "a", "b"):
        insert(client, user_id=user_id)
    response = client.get(
        "/sonos_tokens",
        params={"select": "user_id", "user_id": "gt.a", "order": "user_id.desc", "limit": "5"},
        headers=AUTH,
    )
    assert response.json() == [{"user_id": "c"}, {"user_id": "b"}]


def test_a_wrong_key_answers_401(client: httpx.Client) -> None:
    response = client.get("/sonos_tokens", headers={"apikey": "other", "Authorization": "Bearer other"})
    assert response.status_code == 401


def test_an_unknown_column_or_table_or_operator_is_refused(client: httpx.Client) -> None:
    assert client.get("/sonos_tokens", params={"nope": "eq.1"}, headers=AUTH).json()["code"] == "42703"
    assert client.get("/other_table", headers=AUTH).status_code == 404
    assert client.get("/sonos_tokens", params={"user_id": "like.u*"}, headers=AUTH).status_code == 400
