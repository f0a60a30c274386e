"""`make bench`: run every section against the live services and print one table of figures vs. targets.

Run inside scripts/with-services.sh (REDIS_URL, DATABASE_URL):

    scripts/with-services.sh scripts/bench.sh [--sections warm,cold,...] [--runs N] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from bench import cold_start, layer_size, refresher_scale, single_flight, warm_fetch
from bench.report import Row, render_table
from bench.services import BenchServices, progress, start_services

SECTIONS = ("warm", "cold", "single-flight", "refresher", "layer")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    started = time.monotonic()
    # Other work on the machine moves every figure: the load before and after goes with the table.
    progress("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    rows: list[Row] = []
    services = start_services()
    try:
        runners: dict[str, Callable[[BenchServices], list[Row]]] = {
            "warm": lambda s: warm_fetch.run(s, runs=args.runs, calls=args.calls),
            "cold": lambda s: cold_start.run(s, runs=args.runs),
            "single-flight": lambda s: single_flight.run(s, runs=args.runs),
            "refresher": lambda s: refresher_scale.run(s, runs=args.refresher_runs),
            "layer": lambda s: layer_size.run(),
        }
        for name in sections:
            section_started = time.monotonic()
            progress(f"{name} ...")
            rows += runners[name](services)
            progress(f"{name} done in {time.monotonic() - section_started:.1f} s")
    finally:
        services.stand_in.stop()
    sys.stdout.write(render_table(rows, markdown=args.markdown) + "\n")
    sys.stdout.flush()
    progress("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    progress(f"total {time.monotonic() - started:.0f} s")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    parser.add_argument("--runs", type=int, default=5, help="repeated runs per figure (the median is shown)")
    parser.add_argument("--refresher-runs", type=int, default=3, help="repeated runs of the refresher scenarios")
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per run for the fetch figures")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
