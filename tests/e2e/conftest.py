"""Fixtures for the end-to-end suites: a migrated database of their own."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import MIGRATIONS, SUPABASE_ROLES_SQL


@pytest.fixture
def migrated_database(fresh_database: str) -> str:
    """An empty database with the Supabase roles and the migrations applied, dropped afterwards.

    Key rotation and the refresher scan every row: a database of their own keeps other
    suites' rows (under other key rings) out of their counts.
    """
    with psycopg.connect(fresh_database, autocommit=True) as connection:
        connection.execute(SUPABASE_ROLES_SQL.read_text())
        for migration in MIGRATIONS:
            connection.execute(migration.read_text())
    return fresh_database
