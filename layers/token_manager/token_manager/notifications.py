"""Reconnect notifications: one EventBridge event when a grant stops working."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)

EVENT_SOURCE = "storytailor.sonos-token-service"
RECONNECT_DETAIL_TYPE = "Sonos Reconnect Required"


class ReconnectNotifier(Protocol):
    def reconnect_required(self, user_id: str, reason: str) -> None:
        """Tell the platform the user must connect Sonos again. Never raises."""


class EventBridgeNotifier:
    """Puts ``Sonos Reconnect Required`` events (detail ``{userId, reason}``, never a token)."""

    def __init__(self, bus_name: str, *, client: Any = None) -> None:
        self._bus_name = bus_name
        self._client = client

    def reconnect_required(self, user_id: str, reason: str) -> None:
        entry = {
            "Source": EVENT_SOURCE,
            "DetailType": RECONNECT_DETAIL_TYPE,
            "Detail": json.dumps({"userId": user_id, "reason": reason}),
            "EventBusName": self._bus_name or "default",
        }
        try:
            if self._client is None:  # created on first use: most invocations never notify
                import boto3

                self._client = boto3.client("events")
            answer = self._client.put_events(Entries=[entry])
            if answer.get("FailedEntryCount"):
                logger.error("reconnect event was not accepted", extra={"user_id": user_id, "reason": reason})
        except Exception as exc:  # noqa: BLE001 - the grant is already expired; a lost event must not fail the caller
            logger.error(
                "reconnect event could not be sent",
                extra={"user_id": user_id, "reason": reason, "error": type(exc).__name__},
            )


class NullNotifier:
    """For local runs without EventBridge: logs the event."""

    def reconnect_required(self, user_id: str, reason: str) -> None:
        logger.warning("reconnect required", extra={"user_id": user_id, "reason": reason})
