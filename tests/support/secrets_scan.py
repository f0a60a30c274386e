"""Secret scanning for tests: every secret value a test used must appear nowhere it is captured."""

from __future__ import annotations

from collections.abc import Iterable


def find_leaks(secrets: Iterable[str], texts: Iterable[str]) -> list[str]:
    """The secrets (shortened, for the failure message) that occur in any of ``texts``."""
    haystack = "\n".join(texts)
    return [s[:6] + "..." for s in secrets if s and len(s) >= 8 and s in haystack]
