"""The cold-start baseline: a handler with only boto3, Powertools Logger and Parameters, reading its settings once."""

from __future__ import annotations

import os
from typing import Any

import boto3  # noqa: F401 - part of the baseline: every function of the service loads it
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities import parameters

logger = Logger(service="bare-baseline")

# The same names the service's functions read at cold start (comma-separated by the bench).
NAMES = [name for name in os.environ.get("BENCH_SSM_NAMES", "").split(",") if name]


@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    found = parameters.get_parameters_by_name(
        parameters={name: {} for name in NAMES}, decrypt=True, max_age=300, raise_on_error=False
    )
    return {"read": sorted(name for name in found if name != "_errors")}
