"""How long to wait before retrying a transient Sonos failure: full-jitter backoff and Retry-After."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# 2**32 windows are far past any cap; the bound keeps a huge attempt number from overflowing a float.
_MAX_EXPONENT = 32
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def full_jitter_delay(
    failed_attempts: int,
    *,
    base_seconds: float,
    cap_seconds: float,
    random: Callable[[], float],
) -> float:
    """Seconds to sleep after ``failed_attempts`` failures: uniform in ``[0, min(cap, base * 2**(n-1)))``.

    Full jitter (rather than a fixed exponential step) spreads the retries of many Lambda
    containers that failed together, so they do not hit Sonos again in lock step.

    >>> full_jitter_delay(1, base_seconds=0.25, cap_seconds=2.0, random=lambda: 1.0)
    0.25
    >>> full_jitter_delay(5, base_seconds=0.25, cap_seconds=2.0, random=lambda: 0.5)
    1.0
    """
    exponent = min(max(failed_attempts - 1, 0), _MAX_EXPONENT)
    window = min(cap_seconds, base_seconds * 2.0**exponent)
    return max(0.0, random() * window)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds; ``None`` when absent or unreadable.

    RFC 9110 allows delay-seconds (``"2"``) or an HTTP-date; a date in the past means "now" (0).
    A negative or garbled value is ignored rather than trusted, so the caller falls back to backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 HTTP-dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())
