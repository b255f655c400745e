"""Data loading: a Kaggle-size train.csv (42,000 x 785) parsed cold, from the cache,
and by the plain ways (pandas.read_csv defaults, numpy.loadtxt). Prints a table.

    python benchmarks/bench_data.py [--rows 42000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_train_csv(path: Path, rows: int) -> None:
    """Real embedded MNIST digits, tiled to the requested size."""
    from digitlab import data

    source = data.load_kaggle_dir(data.write_embedded(path.parent / "embedded"))
    idx = np.arange(rows) % len(source.train_labels)
    pixels = np.rint(source.train_images[idx].reshape(rows, -1) * 255).astype(int)
    data._write_int_csv(path, data.TRAIN_HEADER, np.column_stack([source.train_labels[idx], pixels]))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=42_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pandas as pd

    from digitlab import data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kaggle" / "train.csv"
        path.parent.mkdir()
        make_train_csv(path, args.rows)
        cache = path.parent / data.CACHE_DIR_NAME

        def cold():
            shutil.rmtree(cache, ignore_errors=True)
            data.read_csv_cached(path, data.TRAIN_HEADER)

        ways = {
            "digitlab cold (parse + validate + write cache)": cold,
            "digitlab cached": lambda: data.read_csv_cached(path, data.TRAIN_HEADER),
            "pandas.read_csv (defaults)": lambda: pd.read_csv(path),
            "numpy.loadtxt": lambda: np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):  # interleaved, so drift hits every way alike
            for name, fn in ways.items():
                if name == "digitlab cached":
                    data.read_csv_cached(path, data.TRAIN_HEADER)  # make sure the cache exists
                times[name].append(timed(fn))

    size_mb = args.rows * 785 * 2.5 / 1e6
    print(f"train.csv: {args.rows} rows x 785 columns (~{size_mb:.0f} MB), {args.repeats} repeats, median seconds")
    print(f"{'way':<50} {'median s':>9} {'vs pandas':>10}")
    base = statistics.median(times["pandas.read_csv (defaults)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<50} {median:>9.3f} {median / base:>9.2f}x")


if __name__ == "__main__":
    main()
