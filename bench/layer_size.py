"""The layers' unzipped sizes, built as `sam build` builds them: the requirements plus the package.

``pip install --target`` of layers/token_manager/requirements.txt (no bytecode, as SAM
ships none) and the ``token_manager`` sources, summed file by file (what Lambda counts
against its unzipped limit). Shown with and without the packages the Lambda Python
runtime already provides (boto3, botocore, s3transfer, jmespath). The Postgres driver
layer (layers/postgres_driver/, attached only where the template's DatabaseUrl is set)
is measured the same way and shown on its own, without a target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.report import Row
from bench.services import LAYER_DIR, ROOT

SECTION = "layer size (unzipped)"
TARGET_MB = 40.0
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath"})
MB = 1_000_000
DRIVER_LAYER_DIR = ROOT / "layers" / "postgres_driver"


def run() -> list[Row]:
    sizes = _installed_sizes(LAYER_DIR, package="token_manager")
    driver_sizes = _installed_sizes(DRIVER_LAYER_DIR)
    total = sum(sizes.values())
    without_runtime = sum(size for name, size in sizes.items() if name not in RUNTIME_PROVIDED)
    largest = sorted(((size, name) for name, size in sizes.items() if name not in RUNTIME_PROVIDED), reverse=True)
    return [
        Row(SECTION, "everything in requirements.txt + token_manager", total / MB, "MB", digits=1),
        Row(
            SECTION,
            "without boto3/botocore/s3transfer/jmespath (in the runtime)",
            without_runtime / MB,
            "MB",
            TARGET_MB,
            digits=1,
            note="largest: " + ", ".join(f"{name} {size / MB:.1f}" for size, name in largest[:5]),
        ),
        Row(
            SECTION,
            "postgres_driver layer, only with DatabaseUrl",
            sum(driver_sizes.values()) / MB,
            "MB",
            digits=1,
            note=", ".join(f"{name} {size / MB:.1f}" for name, size in sorted(driver_sizes.items())),
        ),
    ]


def _installed_sizes(layer_dir: Path, *, package: str | None = None) -> dict[str, int]:
    """Bytes per distribution of the layer's requirements (and its own package), installed without bytecode."""
    with tempfile.TemporaryDirectory(prefix="bench-layer-") as scratch:
        target = Path(scratch) / "python"
        completed = subprocess.run(  # noqa: S603 - our own interpreter
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-compile",
                "--target",
                str(target),
                "-r",
                str(layer_dir / "requirements.txt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"pip install --target failed: {completed.stderr[-2000:]}")
        if package is not None:
            shutil.copytree(layer_dir / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
        return _bytes_by_distribution(target)


def _bytes_by_distribution(root: Path) -> dict[str, int]:
    """File bytes per top-level name, with each package's metadata and vendored libraries counted with it."""
    sizes: dict[str, int] = defaultdict(int)
    for entry in root.iterdir():
        name = _distribution_name(entry.name)
        if entry.is_dir():
            for directory, _, files in os.walk(entry):
                sizes[name] += sum(os.path.getsize(os.path.join(directory, file)) for file in files)
        else:
            sizes[name] += entry.stat().st_size
    return dict(sizes)


def _distribution_name(entry: str) -> str:
    # boto3-1.44.8.dist-info -> boto3; psycopg_binary.libs -> psycopg_binary; six.py -> six; python_dateutil -> dateutil
    name = entry.split("-")[0].removesuffix(".py").removesuffix(".libs")
    return {"python_dateutil": "dateutil", "pyjwt": "jwt"}.get(name, name)
