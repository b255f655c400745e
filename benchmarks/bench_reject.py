"""Rejecting bad input: the seconds from starting `digitlab train --data-dir D` as a new
process to its exit with status 2 on a malformed train.csv (one non-integer pixel), as wall
time and as the CPU time of the child process. Nothing is trained; what is measured is what
a user waits for before the one-line error."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import Row, median, scratch

ROWS = 4_000  # as many as the embedded default's train.csv
BAD_ROW = ROWS // 2  # a data row in the middle of the file


def write_malformed(directory: Path) -> str:
    """Real digits in Kaggle layout, one pixel of row BAD_ROW written as "12.5"; returns what
    the error must name (the file and its line)."""
    from digitlab import data

    source = data.load_kaggle_dir(data.write_embedded(directory.parent / "embedded"))
    idx = np.arange(ROWS) % len(source.train_labels)
    pixels = np.rint(source.train_images[idx].reshape(ROWS, -1) * 255).astype(int)
    directory.mkdir()
    data.write_int_csv(directory / "train.csv", data.TRAIN_HEADER,
                        np.column_stack([source.train_labels[idx], pixels]))
    lines = (directory / "train.csv").read_text().splitlines()
    cells = lines[BAD_ROW].split(",")
    cells[400] = "12.5"
    lines[BAD_ROW] = ",".join(cells)
    (directory / "train.csv").write_text("\n".join(lines) + "\n")
    test = np.rint(source.test_images.reshape(len(source.test_images), -1) * 255).astype(int)
    data.write_int_csv(directory / "test.csv", data.PIXEL_COLUMNS, test)
    return f"line {BAD_ROW + 1}"


def reject_once(command: list[str], cwd: Path, must_name: str) -> tuple[float, float]:
    """Wall and child CPU seconds (user + system) of one rejected `digitlab train`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 2, f"exit status {done.returncode}, expected 2: {done.stderr[-2000:]}"
    assert "train.csv" in done.stderr and must_name in done.stderr, done.stderr[-2000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(quick: bool) -> list[Row]:
    repeats = 1 if quick else 5
    digitlab = Path(sys.executable).parent / "digitlab"  # the console script of this environment
    with scratch("reject") as root:
        bad = Path(root) / "kaggle"
        must_name = write_malformed(bad)
        command = [str(digitlab), "train", "--data-dir", str(bad)]
        walls, cpus = zip(*(reject_once(command, Path(root), must_name) for _ in range(repeats)),
                          strict=True)
    group = "reject malformed train.csv"
    note = (f"`digitlab train --data-dir D` in a new process until exit status 2; {ROWS:,}-row "
            f"train.csv, a non-integer pixel on line {BAD_ROW + 1}; median of {repeats}")
    return [
        Row(group, "wall time to exit status 2", median(list(walls)), "s", note=note),
        Row(group, "CPU time of the child process (user + system)", median(list(cpus)), "s"),
    ]
