"""What every answer of the service must look like, whatever the input (DESIGN.md section 3).

Refusals carry ``{"error": {"code", "message"}}`` (plus ``status`` on direct invoke) with
a code of the taxonomy and its status; the OAuth callback answers a browser (a page or a
redirect). Nothing a caller gets may hold a stack trace, exception text, an internal
name or host, or the caller's own input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from tests.support.handlers import header

ERROR_STATUS = {
    "invalid_request": 400,
    "invalid_redirect_uri": 400,
    "invalid_state": 400,
    "access_denied": 400,
    "not_connected": 404,
    "household_not_linked": 404,
    "reconnect_required": 409,
    "upstream_unavailable": 503,
    "storage_unavailable": 503,
    "configuration_error": 500,
}
# The refresher's answer: DESIGN.md section 3's counts, plus failedConfiguration (ours to fix).
REFRESHER_SUMMARY_KEYS = (
    "scanned",
    "refreshed",
    "failedTransient",
    "failedPermanent",
    "failedConfiguration",
    "skipped",
)


def refresher_summary(**counts: int) -> dict[str, int]:
    """A refresher answer with every count 0 except those given (by their wire names)."""
    assert set(counts) <= set(REFRESHER_SUMMARY_KEYS), counts
    return {key: counts.get(key, 0) for key in REFRESHER_SUMMARY_KEYS}


# The API resolver's own refusals for a path or method no route serves.
ROUTING_STATUS = {"not_found": 404, "method_not_allowed": 405}

# What an answer would show if an exception or the machinery behind it leaked through.
_INTERNALS = re.compile(
    r"Traceback|File \"|\.py\b|Exception|Error\b|Error:|0x[0-9a-f]{6,}|psycopg|redis|pydantic|postgres|"
    r"validation error|input_value|errors\.pydantic|sonos_tokens|token_manager|aws_lambda_powertools|"
    r"127\.0\.0\.1|localhost",
    re.IGNORECASE,
)


def leaked_internals(text: str) -> list[str]:
    return sorted({match.group(0) for match in _INTERNALS.finditer(text)})


def check_error_body(error: Any, *, direct: bool, forbidden: Collection[str] = ()) -> str:
    """``error`` is the taxonomy's error object; returns its code."""
    assert isinstance(error, dict), error
    keys = {"code", "message", "status"} if direct else {"code", "message"}
    assert set(error) == keys, error
    code, message = error["code"], error["message"]
    statuses = {**ERROR_STATUS, **({} if direct else ROUTING_STATUS)}
    assert code in statuses, code
    if direct:
        assert error["status"] == statuses[code], error
    assert isinstance(message, str)
    assert message
    assert leaked_internals(message) == [], message
    for text in forbidden:
        assert text not in message, f"the answer echoes {text!r}"
    return str(code)


def check_direct_answer(
    answer: Any, success_keys: Collection[str], *, forbidden: Collection[str] = (), allow_5xx: Collection[str] = ()
) -> None:
    """A direct-invoke answer: the operation's success shape or the error body."""
    assert isinstance(answer, dict), answer
    if "error" in answer:
        assert set(answer) == {"error"}, answer
        code = check_error_body(answer["error"], direct=True, forbidden=forbidden)
        assert ERROR_STATUS[code] < 500 or code in allow_5xx, answer
    else:
        assert set(answer) == set(success_keys), answer
        for text in forbidden:
            assert text not in json.dumps(answer), f"the answer echoes {text!r}"


def check_api_answer(
    answer: Any,
    *,
    success_keys: Collection[str] = (),
    browser: bool = False,
    forbidden: Collection[str] = (),
    allow_5xx: Collection[str] = (),
) -> int:
    """An API Gateway proxy answer; returns its status.

    ``browser``: the callback function, whose refusals on its route are pages or redirects.
    """
    assert isinstance(answer, dict), answer
    status = answer.get("statusCode")
    assert isinstance(status, int), answer
    body = answer.get("body")
    assert isinstance(body, str), answer
    assert answer.get("isBase64Encoded") in (False, None), answer
    for text in forbidden:
        assert text not in body, f"the answer echoes {text!r}"
    content_type = header(answer, "Content-Type") or ""
    if browser and status == 302:
        assert header(answer, "Location"), answer
        assert body == ""
        return status
    if browser and content_type.startswith("text/html"):
        assert body.startswith("<!doctype html>"), body[:80]
        assert leaked_internals(body) == [], body
        assert status == 200 or status in set(ERROR_STATUS.values()), status
        assert status < 500 or bool(allow_5xx), status
        return status
    assert content_type == "application/json", answer
    payload = json.loads(body)
    if status >= 400:
        assert set(payload) == {"error"}, payload
        code = check_error_body(payload["error"], direct=False, forbidden=forbidden)
        assert {**ERROR_STATUS, **ROUTING_STATUS}[code] == status, answer
        assert status < 500 or code in allow_5xx, answer
        if status == 405:
            assert header(answer, "Allow"), answer
    else:
        assert status == 200, answer
        assert set(payload) == set(success_keys), payload
    return status
