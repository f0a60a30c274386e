"""Lambda handler: token refresher. Every 5 minutes, refreshes the grants due before the next run."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from token_manager import edge, runtime
from token_manager.observability import lambda_entry, span
from token_manager.refresher import run_refresher

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


def refresh_due_grants(context: LambdaContext) -> dict[str, Any]:
    settings = runtime.get_settings()
    manager, store = runtime.get_manager(), runtime.get_store()
    with span("run_refresher"):
        summary = run_refresher(
            manager,
            store,
            now=datetime.now(UTC),
            period_seconds=settings.refresher_period_seconds,
            refresh_ahead_seconds=settings.refresh_ahead_seconds,
            concurrency=settings.refresher_concurrency,
            remaining_ms=context.get_remaining_time_in_millis,
        )
    return summary.to_dict()


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # The schedule's event carries nothing the run needs; any JSON object starts a run.
    def run(_: Mapping[str, Any]) -> dict[str, Any]:
        return refresh_due_grants(context)

    return edge.answer_direct(event, run)
