"""Choosing the grant store from settings, and what each choice costs a cold start in imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from token_manager.errors import ConfigurationError
from token_manager.store import store_from_settings
from token_manager.store.postgres import PostgresTokenStore
from token_manager.store.supabase import SupabaseTokenStore

ROOT = Path(__file__).resolve().parents[2]
KEY = "factory-service-role-MARKER-0b4e"
DATABASE_URL = "postgresql://service:pw@127.0.0.1:1/postgres"


def test_database_url_chooses_the_postgres_store_without_connecting() -> None:
    store = store_from_settings(database_url=DATABASE_URL, supabase_url=None, supabase_service_role_key=None)
    assert isinstance(store, PostgresTokenStore)


def test_database_url_wins_over_supabase_settings() -> None:
    store = store_from_settings(
        database_url=DATABASE_URL, supabase_url="https://x.supabase.test", supabase_service_role_key=KEY
    )
    assert isinstance(store, PostgresTokenStore)


def test_supabase_url_and_key_choose_the_supabase_store_built_on_first_use() -> None:
    store = store_from_settings(database_url="", supabase_url="https://x.supabase.test", supabase_service_role_key=KEY)
    assert KEY not in repr(store)
    assert store.close.__self__.__class__ is SupabaseTokenStore  # type: ignore[attr-defined]
    assert KEY not in repr(store)
    store.close()


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_no_storage_settings_is_a_configuration_error_naming_them(blank: str | None) -> None:
    with pytest.raises(ConfigurationError) as caught:
        store_from_settings(database_url=blank, supabase_url=blank, supabase_service_role_key=blank)
    for setting in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "DATABASE_URL"):
        assert setting in caught.value.message


def test_a_supabase_url_without_a_key_names_the_missing_key() -> None:
    with pytest.raises(ConfigurationError, match="SUPABASE_SERVICE_ROLE_KEY is not set"):
        store_from_settings(database_url=None, supabase_url="https://x.supabase.test", supabase_service_role_key=None)


def test_a_key_without_a_supabase_url_names_the_missing_url_but_not_the_key() -> None:
    with pytest.raises(ConfigurationError, match="SUPABASE_URL is not set") as caught:
        store_from_settings(database_url=None, supabase_url=None, supabase_service_role_key=KEY)
    assert KEY not in str(caught.value)


def modules_loaded_by(code: str) -> set[str]:
    """Top-level modules a fresh interpreter holds after running ``code``."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'layers' / 'token_manager'}"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_supabase_path_loads_postgrest_only_when_used_and_never_psycopg_nor_the_full_client() -> None:
    choose = (
        "from token_manager.store import store_from_settings\n"
        "store = store_from_settings(database_url=None, supabase_url='https://x.supabase.test', "
        "supabase_service_role_key='k')"
    )
    assert not {"postgrest", "httpx", "psycopg"} & modules_loaded_by(choose)
    loaded = modules_loaded_by(choose + "\nstore.close")
    assert "postgrest" in loaded
    assert not {"psycopg", "supabase", "supabase_auth", "realtime", "storage3"} & loaded


def test_the_postgres_path_loads_neither_httpx_nor_postgrest_until_used() -> None:
    loaded = modules_loaded_by(
        "from token_manager.store import store_from_settings\n"
        f"store_from_settings(database_url={DATABASE_URL!r}, supabase_url=None, supabase_service_role_key=None)"
    )
    assert not {"psycopg", "httpx", "postgrest"} & loaded


def test_database_url_without_the_postgres_driver_layer_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import token_manager.store as store_module

    monkeypatch.setattr(store_module, "postgres_driver_available", lambda: False)
    with pytest.raises(ConfigurationError, match="DatabaseUrl parameter") as caught:
        store_module.store_from_settings(
            database_url="postgresql://u:pw-MARKER@db.internal/x", supabase_url=None, supabase_service_role_key=None
        )
    assert "pw-MARKER" not in str(caught.value)
    assert "db.internal" not in str(caught.value)
