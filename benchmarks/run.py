"""All benchmarks: one table on stdout, the same figures and the machine as JSON.

    python benchmarks/run.py [--quick] [--only 1,2,6] [--keep] [--json benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_data  # noqa: E402
import bench_default  # noqa: E402
import bench_inference  # noqa: E402
import bench_search  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
from common import Row, as_json, machine, print_table  # noqa: E402

FIGURES = {
    "1": bench_train.measure,
    "2": bench_data.measure,
    "3": bench_search.measure,  # also figures 4 and 7
    "5": bench_default.measure,
    "6": bench_inference.measure,
}


def gpu_rows(info: dict, quick: bool) -> list[Row]:
    if info["gpu"] == "CPU":
        return [Row("8 GPU", "images/s on GPU, ours and plain model.fit", None, "images/s",
                    note="this machine has no GPU; run on a GPU machine (KERAS_BACKEND=jax "
                         "works) to fill this row")]
    return bench_train.measure_gpu(quick, info["gpu"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test for CI")
    parser.add_argument("--only", default="", help="comma-separated figures: 1,2,3,5,6,8")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep each scratch directory and its MLflow store instead of deleting it")
    args = parser.parse_args()
    common.KEEP_SCRATCH = args.keep
    wanted = [f for f in args.only.split(",") if f] or [*FIGURES, "8"]
    info = machine()
    rows: list[Row] = []
    for figure in wanted:
        if figure == "8":
            rows += gpu_rows(info, args.quick)
        elif figure in FIGURES:
            rows += FIGURES[figure](args.quick)
        else:
            parser.error(f"unknown figure {figure!r}")
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, "
          f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}, {info['date']}"
          + (" (--quick)" if args.quick else ""))
    print_table(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick,
                                           "figures": as_json(rows)}, indent=1))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
