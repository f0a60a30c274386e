"""Errors of the grant stores that are not outages: the database refused what was written."""

from __future__ import annotations

import re

_CONSTRAINT_IN_MESSAGE = re.compile(r'constraint "([^"]+)"')


class StoreRejected(ValueError):
    """The database refused a write: a check constraint, a malformed value, an unknown
    column. The data is wrong, not the service: the same write fails again, so callers
    must not retry it. The message names the database error code and, when known, the
    constraint; never a value, a token or a key.
    """

    def __init__(self, error_code: str, constraint: str | None = None) -> None:
        self.error_code = error_code
        self.constraint = constraint
        detail = f"{error_code}, constraint {constraint}" if constraint else error_code
        super().__init__(f"sonos_tokens rejected the write ({detail})")


class StoreConflict(StoreRejected):
    """The write collided with an existing row (unique or foreign-key violation, 23505/23503)."""


CONFLICT_CODES = frozenset({"23505", "23503"})


def rejection(error_code: str, constraint: str | None = None) -> StoreRejected:
    """The right rejection for a database error code."""
    if error_code in CONFLICT_CODES:
        return StoreConflict(error_code, constraint)
    return StoreRejected(error_code, constraint)


def constraint_named_in(message: str | None) -> str | None:
    """The constraint a Postgres error message names (PostgREST passes the message on)."""
    if not message:
        return None
    found = _CONSTRAINT_IN_MESSAGE.search(message)
    return found.group(1) if found else None
