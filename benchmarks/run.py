"""All benchmarks: one table on stdout, the same rows and the machine as JSON.

    python benchmarks/run.py [--quick] [--only train,data,inference] [--keep]
                             [--json benchmarks/results.json]

Groups (--only): train (training throughput on the CPU), data (loading a Kaggle-size
train.csv), search (pruning, engines, parallel workers), default (the default search, then
promote and submit: about 20 minutes; not run with --quick), inference (test.csv to
submission.csv), reject (a malformed train.csv rejected by `digitlab train`), selection (one
validation split against 3- and 5-fold validation: how well each ranks trials, what promote
then registers; about an hour and a half), gpu (training throughput on a GPU, when there is one).
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
import bench_reject  # noqa: E402
import bench_search  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import selection  # noqa: E402
from common import Row, as_json, machine, print_table  # noqa: E402

GROUPS = {
    "train": bench_train.measure,
    "data": bench_data.measure,
    "search": bench_search.measure,
    "default": bench_default.measure,
    "inference": bench_inference.measure,
    "reject": bench_reject.measure,
    "selection": selection.measure,
}
# The numbers that earlier versions of this script took for --only.
NUMBERS = {"1": "train", "2": "data", "3": "search", "5": "default", "6": "inference", "8": "gpu"}


def gpu_rows(info: dict, quick: bool) -> list[Row]:
    if info["gpu"] == "CPU":
        return [Row("GPU", "images/s on GPU, ours and plain model.fit", None, "images/s",
                    note="this machine has no GPU; run on a GPU machine (KERAS_BACKEND=jax "
                         "works) to fill this row")]
    return bench_train.measure_gpu(quick, info["gpu"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test for CI")
    parser.add_argument("--only", default="",
                        help=f"comma-separated groups: {', '.join([*GROUPS, 'gpu'])}")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep each scratch directory and its MLflow store instead of deleting it")
    args = parser.parse_args()
    common.KEEP_SCRATCH = args.keep
    wanted = [NUMBERS.get(g, g) for g in args.only.split(",") if g] or [*GROUPS, "gpu"]
    for group in wanted:
        if group != "gpu" and group not in GROUPS:
            parser.error(f"unknown group {group!r} (known: {', '.join([*GROUPS, 'gpu'])})")
    info = machine()
    rows: list[Row] = []
    for group in dict.fromkeys(wanted):
        rows += gpu_rows(info, args.quick) if group == "gpu" else GROUPS[group](args.quick)
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, "
          f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}, {info['date']}"
          + (" (--quick)" if args.quick else ""))
    print_table(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick,
                                           "rows": as_json(rows)}, indent=1))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
