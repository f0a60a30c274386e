"""The secret guard itself: it fails a test for every way a secret can get out, and only then.

The guarded tests run in a pytest of their own (a subprocess), since a guard's verdict
comes at teardown, after the test it judges.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[2]

GUARDED_TESTS = """
import json
import logging

import requests
import responses

from token_manager import edge

TOKEN = "tok-MARKER-0001-leaky"


def test_logged_secret(secret_guard):
    secret_guard.add(TOKEN)
    logging.getLogger("token_manager.anything").debug("refreshed %s", TOKEN)


def test_secret_in_a_log_extra(secret_guard):
    secret_guard.add(TOKEN)
    logging.getLogger("somewhere").info("refreshed", extra={"token": TOKEN})


def test_printed_secret(secret_guard):
    secret_guard.add(TOKEN)
    print("token:", TOKEN)


def test_secret_in_a_handler_answer(secret_guard):
    secret_guard.add(TOKEN)
    edge.answer_direct({}, lambda payload: {"error": {"code": "x", "message": TOKEN, "status": 500}})


def test_secret_in_an_exception_cause(secret_guard):
    secret_guard.add(TOKEN)
    try:
        try:
            raise ValueError(TOKEN)
        except ValueError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as exc:
        secret_guard.seen(exc)


def test_token_from_a_token_response_then_logged(secret_guard):
    with responses.RequestsMock() as sonos:
        sonos.add(responses.POST, "https://sonos.test/token", json={"access_token": "harvested-MARKER-0002"})
        requests.post("https://sonos.test/token", data={"grant_type": "refresh_token"}, timeout=1)
    logging.getLogger("x").warning("got %s", "harvested-MARKER-0002")


def test_client_secret_from_basic_auth_in_a_url(secret_guard):
    with responses.RequestsMock() as sonos:
        sonos.add(responses.POST, "https://sonos.test/token", json={})
        sonos.add(responses.GET, "https://sonos.test/echo", json={})
        requests.post("https://sonos.test/token", auth=("id", "client-secret-MARKER-3"), timeout=1)
        requests.get("https://sonos.test/echo?s=client-secret-MARKER-3", timeout=1)


def test_clean_test_passes(secret_guard):
    secret_guard.add(TOKEN)
    logging.getLogger("token_manager.anything").warning("refreshed a token for user %s", "u-1")


def test_a_fetch_answer_may_carry_its_access_token(secret_guard):
    secret_guard.add(TOKEN)
    answer = edge.answer_direct({}, lambda payload: {"accessToken": TOKEN, "householdId": "h"})
    assert answer["accessToken"] == TOKEN


def test_the_callback_url_may_carry_the_code(secret_guard):
    with responses.RequestsMock() as api:
        api.add(responses.GET, "http://127.0.0.1:3000/sonos/oauth/callback", body="ok")
        api.add(responses.POST, "https://sonos.test/token", json={})
        requests.get("http://127.0.0.1:3000/sonos/oauth/callback?code=code-MARKER-0004&state=s", timeout=1)
        requests.post("https://sonos.test/token", data={"code": "code-MARKER-0004"}, timeout=1)
"""

EXPECTED_LEAKS = {
    "test_logged_secret": "in log record",
    "test_secret_in_a_log_extra": "in log record",
    "test_printed_secret": "in captured stdout call",
    "test_secret_in_a_handler_answer": "in a handler answer",
    "test_secret_in_an_exception_cause": "in seen by the test",
    "test_token_from_a_token_response_then_logged": "in log record",
    "test_client_secret_from_basic_auth_in_a_url": "in a requested URL",
}
EXPECTED_CLEAN = {
    "test_clean_test_passes",
    "test_a_fetch_answer_may_carry_its_access_token",
    "test_the_callback_url_may_carry_the_code",
}


def test_the_guard_fails_every_leak_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "test_guarded.py").write_text(GUARDED_TESTS)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(tmp_path),
            "-p",
            "tests.support.secret_guard",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "--rootdir",
            str(tmp_path),
            "-o",
            "log_level=DEBUG",
            f"--junitxml={tmp_path / 'results.xml'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'layers' / 'token_manager'}", "PATH": "/usr/bin:/bin"},
    )
    output = run.stdout + run.stderr
    errored: dict[str, str] = {}
    clean: set[str] = set()
    report = ElementTree.parse(tmp_path / "results.xml")  # noqa: S314 - our own pytest wrote it
    for case in report.getroot().iter("testcase"):
        error = case.find("error")
        if error is not None:
            errored[case.attrib["name"]] = error.attrib.get("message", "")
        elif case.find("failure") is None and case.find("skipped") is None:
            clean.add(case.attrib["name"])
    assert set(errored) == set(EXPECTED_LEAKS), output
    for test, where in EXPECTED_LEAKS.items():
        assert "secrets leaked" in errored[test], (test, errored[test])
        assert where in errored[test], (test, errored[test])
    assert clean == EXPECTED_CLEAN, output
