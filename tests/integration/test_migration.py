"""The schema on a real Postgres 15 with Supabase's roles: constraints, trigger, RLS."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from tests.conftest import MIGRATIONS, SUPABASE_ROLES_SQL

pytestmark = pytest.mark.integration

ROW = {
    "user_id": "user-1",
    "household_id": "Sonos_HH1",
    "household_ids": ["Sonos_HH1"],
    "access_token_encrypted": "ciphertext-a",
    "refresh_token_encrypted": "ciphertext-r",
    "encryption_key_id": "k1",
    "expires_at": "2030-01-01T00:00:00Z",
}


def insert(conn: psycopg.Connection, **overrides: object) -> None:
    row = {**ROW, **overrides}
    cols = ", ".join(row)
    marks = ", ".join(f"%({c})s" for c in row)
    conn.execute(f"insert into sonos_tokens ({cols}) values ({marks})", row)


@pytest.fixture
def db(fresh_database: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(SUPABASE_ROLES_SQL.read_text())
        for migration in MIGRATIONS:
            conn.execute(migration.read_text())
        yield conn


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_client_roles_can_neither_read_nor_write(db: psycopg.Connection, role: str) -> None:
    insert(db)
    db.execute(f"set role {role}")
    with pytest.raises(errors.InsufficientPrivilege):
        db.execute("select * from sonos_tokens").fetchall()
    with pytest.raises(errors.InsufficientPrivilege):
        insert(db, user_id="intruder")
    with pytest.raises(errors.InsufficientPrivilege):
        db.execute("update sonos_tokens set token_status = 'revoked'")
    with pytest.raises(errors.InsufficientPrivilege):
        db.execute("delete from sonos_tokens")
    db.execute("reset role")
    assert db.execute("select token_status from sonos_tokens").fetchall() == [("active",)]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_row_level_security_hides_rows_even_if_a_grant_slips_in(db: psycopg.Connection, role: str) -> None:
    insert(db)
    db.execute(f"grant select, update on sonos_tokens to {role}")
    db.execute(f"set role {role}")
    assert db.execute("select * from sonos_tokens").fetchall() == []
    assert db.execute("update sonos_tokens set scope = 'x' returning user_id").fetchall() == []
    db.execute("reset role")


def test_service_role_reads_and_writes(db: psycopg.Connection) -> None:
    db.execute("set role service_role")
    insert(db)
    db.execute("update sonos_tokens set scope = 'playback-control-all' where user_id = 'user-1'")
    assert db.execute("select scope from sonos_tokens").fetchone() == ("playback-control-all",)
    assert db.execute("delete from sonos_tokens returning user_id").fetchall() == [("user-1",)]
    db.execute("reset role")


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_status": "paused"},
        {"user_id": ""},
        {"user_id": "   "},
        {"household_id": ""},
        {"household_ids": []},
        {"household_ids": ["Sonos_OTHER"]},
        {"encryption_key_id": ""},
        {"access_token_encrypted": None},
        {"expires_at": None},
    ],
    ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()),
)
def test_constraints_refuse_bad_rows(db: psycopg.Connection, overrides: dict[str, object]) -> None:
    with pytest.raises((errors.CheckViolation, errors.NotNullViolation)):
        insert(db, **overrides)
    assert db.execute("select count(*) from sonos_tokens").fetchone() == (0,)


def test_expired_row_may_hold_no_tokens(db: psycopg.Connection) -> None:
    insert(db, token_status="expired", access_token_encrypted=None, refresh_token_encrypted=None)
    assert db.execute("select token_status from sonos_tokens").fetchone() == ("expired",)


def test_every_write_gets_a_new_version_that_is_never_reused(db: psycopg.Connection) -> None:
    insert(db)
    (v1, created, updated1) = db.execute("select version, created_at, updated_at from sonos_tokens").fetchone()
    db.execute("update sonos_tokens set scope = 's', version = 1, created_at = now() - interval '1 day'")
    (v2, created2, updated2) = db.execute("select version, created_at, updated_at from sonos_tokens").fetchone()
    assert v2 > v1 >= 1
    assert created2 == created
    assert updated2 >= updated1
    db.execute("delete from sonos_tokens")
    insert(db)
    (v3,) = db.execute("select version from sonos_tokens").fetchone()
    assert v3 > v2


def test_refresher_index_and_rls_are_in_place(db: psycopg.Connection) -> None:
    (indexdef,) = db.execute(
        "select indexdef from pg_indexes where tablename = 'sonos_tokens' and indexdef like '%expires_at%'"
    ).fetchone()
    assert "(token_status, expires_at)" in indexdef
    assert db.execute("select relrowsecurity from pg_class where relname = 'sonos_tokens'").fetchone() == (True,)


def test_applying_the_migration_twice_fails_clearly_and_changes_nothing(db: psycopg.Connection) -> None:
    insert(db)
    with pytest.raises(errors.RaiseException, match="already applied"):
        db.execute(MIGRATIONS[0].read_text())
    db.execute("rollback")
    assert db.execute("select user_id from sonos_tokens").fetchall() == [("user-1",)]
