"""Data loading: a Kaggle-size train.csv (42,000 x 785, real embedded digits tiled) parsed and
validated cold and loaded from the cache, versus pandas.read_csv defaults and numpy.loadtxt."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import Row, interleaved, median

ROWS = 42_000


def make_train_csv(path: Path, rows: int) -> None:
    from digitlab import data

    source = data.load_kaggle_dir(data.write_embedded(path.parent / "embedded"))
    idx = np.arange(rows) % len(source.train_labels)
    pixels = np.rint(source.train_images[idx].reshape(rows, -1) * 255).astype(int)
    data.write_int_csv(path, data.TRAIN_HEADER, np.column_stack([source.train_labels[idx], pixels]))


def measure(quick: bool) -> list[Row]:
    import pandas as pd

    from digitlab import csvfiles, data

    repeats = 1 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kaggle" / "train.csv"
        path.parent.mkdir()
        make_train_csv(path, ROWS)
        cache = path.parent / data.CACHE_DIR_NAME

        def cold():
            shutil.rmtree(cache, ignore_errors=True)
            csvfiles.read_csv_cached(path, data.TRAIN_HEADER)

        def cached():
            csvfiles.read_csv_cached(path, data.TRAIN_HEADER)

        ways = {"cold": cold, "cached": cached, "pandas": lambda: pd.read_csv(path),
                "loadtxt": lambda: np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)}
        if quick:
            ways.pop("loadtxt")  # the slowest way adds nothing to a smoke test
        times = interleaved(ways, repeats)
    group = "data loading"
    rows = [
        Row(group, "digitlab cold: parse + validate + cache", median(times["cold"]), "s", "a few s", median(times["cold"]) < 5,
            note=f"{ROWS} x 785 train.csv, median of {repeats}"),
        Row(group, "digitlab from cache", median(times["cached"]), "s", "< 0.5 s", median(times["cached"]) < 0.5),
        Row(group, "pandas.read_csv, defaults", median(times["pandas"]), "s"),
    ]
    if "loadtxt" in times:
        rows.append(Row(group, "numpy.loadtxt", median(times["loadtxt"]), "s"))
    return rows
