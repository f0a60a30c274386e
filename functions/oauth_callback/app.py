"""Lambda handler: oauth_callback (wired to the token_manager layer)."""

from __future__ import annotations

from typing import Any

from token_manager.errors import ConfigurationError


def lambda_handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    return ConfigurationError("This function is not wired yet.").to_direct_body()
