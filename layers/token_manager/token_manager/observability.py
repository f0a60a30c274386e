"""Structured logs, traces and metrics for the handlers: Powertools, configured once per container.

Every handler wraps its ``lambda_handler`` in :func:`lambda_entry`. The layer's own
modules keep using ``logging.getLogger(__name__)``: their records are routed through
the Powertools handler here, so they come out as the same JSON lines with the same
correlation id. Nothing here ever logs or traces an event or a response: events carry
authorization codes and answers carry access tokens.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit, single_metric

if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer

__all__ = [
    "METRICS_NAMESPACE",
    "SERVICE_NAME",
    "CountingMetrics",
    "correlation_id_of",
    "count_error",
    "counters",
    "get_tracer",
    "lambda_entry",
    "logger",
    "metrics",
    "record_latency_ms",
    "route_layer_logs",
    "span",
    "tracing_enabled",
]

SERVICE_NAME = os.environ.get("POWERTOOLS_SERVICE_NAME", "").strip() or "sonos-token-service"
METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "").strip() or "SonosTokenService"
LAYER_LOGGER_NAME = "token_manager"
# The X-Ray SDK patches these when tracing is on: AWS calls and the Sonos HTTP calls.
# Neither records bodies or auth headers, only method, URL and status.
TRACED_MODULES = ("botocore", "requests")

# A correlation id is echoed into every log line: accept only a plain token-like id,
# never a caller's arbitrary text.
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
LambdaHandler = Callable[[Any, Any], Any]

# `name` says which module logged; set here, it survives the per-invocation clear_state.
logger = Logger(service=SERVICE_NAME, utc=True, name="%(name)s")
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)

# Powertools warns on every invocation that counted nothing but the cold start: noise. One
# filter for the process (catch_warnings per invocation cost time and is not thread-safe).
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)


def route_layer_logs() -> None:
    """Send the layer's standard-library loggers (``token_manager.*``) through the Powertools
    handler, and only there: in Lambda the root logger has a handler of its own, and a
    record reaching both would be written twice. Idempotent."""
    logging.getLogger(LAYER_LOGGER_NAME)  # registered, so Powertools finds it
    copy_config_to_registered_loggers(source_logger=logger, include={LAYER_LOGGER_NAME})


class CountingMetrics:
    """The manager's ``Metrics`` port: counts summed per invocation, emitted once each.

    A refresher run may count thousands of refreshes; one EMF value per event would
    overflow CloudWatch's 100-values-per-metric limit, so counts are summed here and
    written when the invocation ends. Thread-safe: the refresher counts from a pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}

    def add(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0.0) + value

    def pending(self) -> dict[str, float]:
        with self._lock:
            return dict(self._counts)

    def flush_into(self, target: Metrics) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        for name, value in sorted(counts.items()):
            target.add_metric(name=name, unit=MetricUnit.Count, value=value)


counters = CountingMetrics()


def record_latency_ms(name: str, milliseconds: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 3))


def count_error(code: str) -> None:
    """One ``Errors`` data point with the error code as a dimension (failures by kind)."""
    with single_metric(
        name="Errors",
        unit=MetricUnit.Count,
        value=1,
        namespace=METRICS_NAMESPACE,
        default_dimensions={"service": SERVICE_NAME},
    ) as metric:
        metric.add_dimension(name="ErrorCode", value=code)


def correlation_id_of(event: object) -> str | None:
    """API Gateway's ``requestContext.requestId``, else the router payload's ``correlationId``."""
    if not isinstance(event, Mapping):
        return None
    request_context = event.get("requestContext")
    candidate = event.get("correlationId")
    if isinstance(request_context, Mapping):  # an API Gateway event: its own request id wins
        candidate = request_context.get("requestId")
    if isinstance(candidate, str) and _CORRELATION_ID.fullmatch(candidate):
        return candidate
    return None


def tracing_enabled() -> bool:
    """Powertools' own rule (off when POWERTOOLS_TRACE_DISABLED is true, outside Lambda and
    under SAM local), decided here so a container that will not trace never imports the
    X-Ray SDK (about 300 ms at cold start)."""
    disabled = os.environ.get("POWERTOOLS_TRACE_DISABLED", "").strip().lower() in ("1", "true", "yes", "on")
    in_lambda = bool(os.environ.get("LAMBDA_TASK_ROOT"))
    emulated = bool(os.environ.get("AWS_SAM_LOCAL") or os.environ.get("AWS_CHALICE_CLI_MODE"))
    return not disabled and in_lambda and not emulated


_tracer: Tracer | None = None
_tracing_decided = False


def get_tracer() -> Tracer | None:
    """The container's Tracer, or None when tracing is off (decided once: the environment is the container's)."""
    global _tracer, _tracing_decided
    if not _tracing_decided:
        if tracing_enabled():
            from aws_lambda_powertools import Tracer

            _tracer = Tracer(service=SERVICE_NAME, patch_modules=TRACED_MODULES)
        _tracing_decided = True
    return _tracer


@contextmanager
def span(name: str) -> Iterator[None]:
    """A trace subsegment around a step (a no-op without tracing). Records no values."""
    tracer = get_tracer()
    scope = tracer.provider.in_subsegment(f"## {name}") if tracer is not None else nullcontext()
    with scope:
        yield


def lambda_entry(handler: HandlerT) -> HandlerT:
    """Wrap a ``lambda_handler``: JSON logs with the correlation id, the cold-start and
    counted metrics, and a trace that records neither the event nor the response."""

    route_layer_logs()

    @functools.wraps(handler)
    def with_correlation(event: Any, context: Any) -> Any:
        logger.set_correlation_id(correlation_id_of(event))
        try:
            return handler(event, context)
        finally:
            counters.flush_into(metrics)

    wrapped: LambdaHandler = with_correlation
    tracer = get_tracer()
    if tracer is not None:
        wrapped = tracer.capture_lambda_handler(wrapped, capture_response=False, capture_error=False)
    wrapped = metrics.log_metrics(wrapped, capture_cold_start_metric=True)
    wrapped = logger.inject_lambda_context(wrapped, log_event=False, clear_state=True)
    return functools.wraps(handler)(wrapped)  # type: ignore[return-value]
