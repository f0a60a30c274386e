"""Fixtures shared by every suite: the real services started by scripts/with-services.sh."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every test is scanned for secrets in its logs, output, answers and requested URLs.
pytest_plugins = ["tests.support.secret_guard"]

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
SUPABASE_ROLES_SQL = ROOT / "tests" / "sql" / "supabase_roles.sql"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the tests through `make test`, which starts Redis and Postgres")
    return value


@pytest.fixture(scope="session")
def database_url() -> str:
    return _required_env("DATABASE_URL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _required_env("REDIS_URL")


@pytest.fixture
def fresh_database(database_url: str) -> Iterator[str]:
    """An empty database of its own on the test server, dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = database_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def migrated_database(fresh_database: str) -> str:
    """An empty database with the Supabase roles and the migrations applied, dropped afterwards.

    Key rotation and the refresher scan every row: a database of their own keeps other
    suites' rows (under other key rings) out of their counts.
    """
    import psycopg

    with psycopg.connect(fresh_database, autocommit=True) as connection:
        connection.execute(SUPABASE_ROLES_SQL.read_text())
        for migration in MIGRATIONS:
            connection.execute(migration.read_text())
    return fresh_database
