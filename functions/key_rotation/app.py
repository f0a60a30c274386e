"""Lambda handler: key rotation. Every 30 days (or on demand): new active key, stored grants re-encrypted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from token_manager import edge, runtime
from token_manager.key_rotation import run_key_rotation
from token_manager.observability import lambda_entry, span

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


def rotate_key(_: Mapping[str, Any]) -> dict[str, Any]:
    # The ring is read fresh from SSM (never this container's cached copy) and each new
    # ring is written back to SSM before any row uses it.
    ring = runtime.load_current_key_ring()
    with span("run_key_rotation"):
        return run_key_rotation(runtime.get_store(), ring, persist_ring=runtime.persist_key_ring)


@lambda_entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return edge.answer_direct(event, rotate_key)
