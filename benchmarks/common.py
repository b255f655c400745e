"""Shared benchmark helpers: machine description, interleaved timing, the result table."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_SCRATCH = False  # run.py --keep: leave each scratch store for the MLflow UI


@dataclass
class Row:
    group: str
    measure: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    note: str = ""

    def status(self) -> str:
        return "" if self.met is None else ("met" if self.met else "MISSED")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("tensorflow", "keras", "jax", "mlflow", "optuna", "keras-tuner", "numpy", "pandas"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    if "mlflow" not in versions:  # a GPU machine may carry only the client, mlflow-skinny
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["mlflow-skinny"] = importlib.metadata.version("mlflow-skinny")
    from digitlab import runtime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": runtime.device_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
    }


def interleaved(ways: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each way `repeats` times in turn (A B A B ...), so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def scratch(name: str):
    """A throw-away working directory with its own MLflow store and the repo's configs."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    root = Path(tempfile.mkdtemp(prefix=f"digitlab-bench-{name}-"))
    for folder in ("experiments", "search", "registry"):
        shutil.copytree(REPO / folder, root / folder)
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        yield root
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
        if KEEP_SCRATCH:
            print(f"kept {root} (MLFLOW_TRACKING_URI=sqlite:///{root / 'mlflow.db'})", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[Row]) -> None:
    headers = ["group", "measure", "value", "unit", "target", "status"]
    cells = [[r.group, r.measure, "-" if r.value is None else f"{r.value:,.4g}", r.unit, r.target,
              r.status()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    for r in rows:
        if r.note:
            print(f"  note ({r.group}, {r.measure}): {r.note}")


def as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) | {"status": r.status()} for r in rows]


def claim(out: Path, settings: dict) -> None:
    """Keep a study's --out to one setting: runs made otherwise would be summarised as its own."""
    record = out / "settings.json"
    if record.exists() and json.loads(record.read_text()) != settings:
        print(f"error: {out} holds runs made with {record.read_text()}, "
              f"not {json.dumps(settings)}: use another --out", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings))


def publish(summary: dict, print_summary: Callable[[dict], None], json_path: str) -> None:
    """A study's summary printed, and written as JSON."""
    print_summary(summary)
    Path(json_path).write_text(json.dumps(summary, indent=1))
    print(f"written to {json_path}")
