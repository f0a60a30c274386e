"""One cold start in this fresh interpreter: load a handler by path, invoke it once, report time and peak RSS.

    python bench/cold_start_child.py <function name | bare> '<event JSON>'

Prints one JSON line: ``{"import_ms", "total_ms", "rss_mb", "answer"}``. Only the
standard library is imported before the clock starts (what Lambda's bootstrap has
loaded too); the handler's imports, its settings read from SSM and its first
invocation's set-up are all inside the measurement.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import importlib.util  # noqa: E402 - the clock starts before anything else
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BARE_HANDLER = Path(__file__).resolve().parent / "bare_handler.py"


class _Context:
    """The parts of the Lambda context the handlers and Powertools read."""

    function_name = "sonos-token-service-cold-start"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:sonos-token-service-cold-start"
    aws_request_id = "00000000-0000-4000-8000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 240_000


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark of the
    address space a process replaced at exec into it, so a child spawned by a large
    parent (this bench holds moto, psycopg, redis) would report the parent's peak.
    VmHWM belongs to the address space exec created; ru_maxrss is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(name: str, event: Any) -> dict[str, Any]:
    path = BARE_HANDLER if name == "bare" else ROOT / "functions" / name / "app.py"
    spec = importlib.util.spec_from_file_location(f"cold_start_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    imported = time.perf_counter()
    answer = module.lambda_handler(event, _Context())
    finished = time.perf_counter()
    return {
        "import_ms": (imported - STARTED) * 1000,
        "total_ms": (finished - STARTED) * 1000,
        "rss_mb": peak_rss_mb(),
        "answer": answer,
    }


if __name__ == "__main__":
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    sys.stdout.flush()
    # The handlers print metrics and logs to stdout: the result is the last line, marked.
    sys.stdout.write("COLD_START_RESULT " + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
