"""`make demo` end to end: the story passes on a migrated database, and a broken step names itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_SEC = 90
STEP_TITLES = (
    "initiate (platform backend)",
    "the user presses Allow at Sonos",
    "callback (the browser's redirect)",
    "same callback again (C7 double click)",
    "another user presses Deny",
    "fetch by the router (direct invoke)",
    "fetch over the API: cache hit",
    "drop the cache entry, fetch: store read",
    "token ages; 8 fetches at once",
    "scheduled refresher run",
    "key rotation",
    "fetch after rotation",
    "revoke by the router (direct invoke)",
    "fetch after revoke",
    "no secret in logs, pages or transcript",
)


def _run_demo(database_url: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    # A process of its own, as `make demo` runs it: a fresh set of "containers" and its own stdout.
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "devtools.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SEC,
        check=False,
    )


def test_demo_runs_every_step_through_the_handlers_and_exits_zero(migrated_database: str, redis_url: str) -> None:
    result = _run_demo(migrated_database, redis_url)

    assert result.returncode == 0, result.stdout + result.stderr
    numbered = [line for line in result.stdout.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert [line[4:].split("  ")[0].strip() for line in numbered] == list(STEP_TITLES)
    assert all(line.rstrip().endswith(" ok") for line in numbered)
    assert "Sonos saw exactly 1 refresh request (single flight" in result.stdout
    assert "Every step did what it should" in result.stdout


def test_demo_names_the_failing_step_and_exits_non_zero(fresh_database: str, redis_url: str) -> None:
    # No migration: linking cannot store the grant, so the callback is the first step to fail.
    result = _run_demo(fresh_database, redis_url)

    assert result.returncode == 1
    assert "DEMO FAILED at step 3 (callback (the browser's redirect))" in result.stdout
    assert "Every step did what it should" not in result.stdout
