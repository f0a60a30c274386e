"""The scheduled background refresher: refresh every grant that comes due before the next run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

from token_manager.manager import RefreshOutcome, SonosTokenManager
from token_manager.models import StoredGrant
from token_manager.store.base import TokenStore

logger = logging.getLogger(__name__)

PAGE_SIZE = 200
# Stop taking new grants when less than this is left of the invocation: a refresh in
# flight needs up to three Sonos attempts, and what is left over waits for the next run.
STOP_MARGIN_MS = 20_000


@dataclass
class RefresherSummary:
    scanned: int = 0
    refreshed: int = 0
    failed_transient: int = 0
    failed_permanent: int = 0
    failed_configuration: int = 0
    skipped: int = 0
    client_rejected: bool = False  # Sonos refused our client: the run starts nothing more

    def count(self, outcome: RefreshOutcome) -> None:
        if outcome is RefreshOutcome.REFRESHED:
            self.refreshed += 1
        elif outcome is RefreshOutcome.FAILED_TRANSIENT:
            self.failed_transient += 1
        elif outcome is RefreshOutcome.FAILED_PERMANENT:
            self.failed_permanent += 1
        elif outcome in (RefreshOutcome.FAILED_CONFIGURATION, RefreshOutcome.CLIENT_REJECTED):
            self.failed_configuration += 1
            self.client_rejected = self.client_rejected or outcome is RefreshOutcome.CLIENT_REJECTED
        else:  # skipped (lock held elsewhere) or not due after all
            self.skipped += 1

    def to_dict(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "refreshed": self.refreshed,
            "failedTransient": self.failed_transient,
            "failedPermanent": self.failed_permanent,
            "failedConfiguration": self.failed_configuration,
            "skipped": self.skipped,
        }


def run_refresher(
    manager: SonosTokenManager,
    store: TokenStore,
    *,
    now: datetime,
    period_seconds: int,
    refresh_ahead_seconds: int,
    concurrency: int,
    remaining_ms: Callable[[], int],
    page_size: int = PAGE_SIZE,
    stop_margin_ms: int = STOP_MARGIN_MS,
) -> RefresherSummary:
    """Refresh, with at most ``concurrency`` at once, the active grants whose refresh
    point falls before the next run (``now + period``). Grants left when the
    invocation's time runs low, or once Sonos has refused our client credentials, are
    counted as skipped and picked up next time."""
    due_before = now + timedelta(seconds=period_seconds)
    scan_before = due_before + timedelta(seconds=refresh_ahead_seconds)
    summary = RefresherSummary()
    grants = _due_grants(store, scan_before, page_size)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="refresher") as pool:
        in_flight: set[Future[RefreshOutcome]] = set()
        for grant in grants:
            summary.scanned += 1
            if len(in_flight) >= concurrency:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                _collect(done, summary)
            if summary.client_rejected or remaining_ms() < stop_margin_ms:
                # Keep counting what is due, but start nothing new: time is short, or Sonos
                # refuses our client and would refuse every other grant's refresh the same way.
                summary.skipped += 1
                continue
            in_flight.add(pool.submit(manager.refresh_if_due, grant, due_before))
        done, _ = wait(in_flight)
        _collect(done, summary)
    logger.info("refresher finished", extra=summary.to_dict())
    return summary


def _due_grants(store: TokenStore, before: datetime, page_size: int) -> Iterator[StoredGrant]:
    # Stop on an empty page, not a short one: Supabase caps pages at its max-rows setting,
    # which may be lower than page_size.
    after: str | None = None
    while page := store.list_due(before, page_size, after):
        yield from page
        after = page[-1].user_id


def _collect(done: set[Future[RefreshOutcome]], summary: RefresherSummary) -> None:
    for future in done:
        try:
            summary.count(future.result())
        except Exception as exc:  # noqa: BLE001 - one grant's trouble must not stop the run
            logger.error("refresh step failed unexpectedly", extra={"error": type(exc).__name__})
            summary.failed_transient += 1
