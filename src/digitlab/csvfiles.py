"""Kaggle's CSV files: the layout, a fast parse with an exact diagnosis of the first
problem (file, line, column), and a binary cache of validated files beside them.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

from digitlab import osutil
from digitlab.errors import DataError

N_PIXELS = 784
PIXEL_COLUMNS = [f"pixel{i}" for i in range(N_PIXELS)]
TRAIN_HEADER = ["label", *PIXEL_COLUMNS]
SOLUTION_HEADER = ["ImageId", "Label"]
CACHE_DIR_NAME = ".digitlab-cache"
CACHE_VERSION = 1


def _upper_limit(column: str) -> int:
    if column in ("label", "Label"):
        return 9
    return np.iinfo(np.int64).max if column == "ImageId" else 255


# One cell of each kind that needs no closer look: a label 0-9, a pixel 0-255, an ImageId.
_CELL = {"label": "[0-9]", "Label": "[0-9]", "ImageId": "[0-9]+",
         "pixel": "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"}


def _sound_row(expected: list[str]) -> re.Pattern:
    """A row that is certainly valid: the walk below skips such rows with one regex match
    (in C) instead of converting each of its 785 cells in Python."""
    cells = [_CELL.get(c, _CELL["pixel"]) for c in expected]
    return re.compile(",".join(cells))


def _first_problem(path: Path, expected: list[str]) -> str:
    """Walk a CSV that failed the fast parse and describe its first problem exactly."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    ends_with_newline = text.endswith(("\n", "\r"))
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is tolerated
    if not lines:
        return f"{path}: file is empty"
    if len(lines) == 1:
        return f"{path}: no data rows after the header"
    sound = _sound_row(expected)
    for number, line in enumerate(lines[1:], start=2):
        if sound.fullmatch(line):
            continue
        cells = line.split(",")
        if len(cells) != len(expected):
            if number == len(lines) and not ends_with_newline and len(cells) < len(expected):
                return (
                    f"{path}: line {number}, column {expected[len(cells)]}: file is cut off "
                    f"mid-row ({len(cells)} of {len(expected)} fields)"
                )
            if len(cells) < len(expected):
                return (
                    f"{path}: line {number}, column {expected[len(cells)]}: missing "
                    f"(row has {len(cells)} fields, expected {len(expected)})"
                )
            return (
                f"{path}: line {number}, column {len(expected) + 1}: extra field "
                f"(row has {len(cells)} fields, expected {len(expected)})"
            )
        for column, cell in zip(expected, cells, strict=True):
            cell = cell.strip()
            where = f"{path}: line {number}, column {column}"
            if not cell:
                return f"{where}: empty cell"
            try:
                value = int(cell)
            except ValueError:
                try:
                    float(cell)
                except ValueError:
                    return f"{where}: {cell!r} is not a number"
                return f"{where}: {cell!r} is not an integer"
            upper = _upper_limit(column)
            if not 0 <= value <= upper:
                return f"{where}: {value} is outside 0-{upper}"
    return f"{path}: could not be parsed"


def _check_header(path: Path, expected: list[str]) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    if not first.strip():
        raise DataError(f"{path}: file is empty" if not first else f"{path}: line 1: no header")
    header = [c.strip() for c in first.rstrip("\r\n").split(",")]
    if all(c.lstrip("-").isdigit() for c in header):
        raise DataError(f"{path}: line 1: no header (expected {','.join(expected[:3])},...)")
    seen: set[str] = set()
    for c in header:
        if c in seen:
            raise DataError(f"{path}: line 1, column {c}: duplicated column")
        seen.add(c)
    if "label" in header and "label" not in expected:
        raise DataError(f"{path}: line 1, column label: test.csv must not have a label column")
    for position, (got, want) in enumerate(zip(header, expected, strict=False), start=1):
        if got != want:
            if got not in expected:
                raise DataError(
                    f"{path}: line 1, column {position}: unexpected column {got!r} (expected {want!r})"
                )
            raise DataError(f"{path}: line 1, column {position}: {got!r} out of order (expected {want!r})")
    if len(header) < len(expected):
        raise DataError(f"{path}: line 1: missing column {expected[len(header)]!r}")
    if len(header) > len(expected):
        raise DataError(f"{path}: line 1, column {len(expected) + 1}: extra column {header[len(expected)]!r}")


def read_csv(path: Path, expected: list[str]) -> np.ndarray:
    """Parse a Kaggle CSV into an int64 array, or raise DataError naming line and column.

    The fast path is pandas' C parser: it infers int64 only when every cell is an
    integer literal, so any float, text, empty cell or short row shows up as a
    non-integer column and sends us to the exact (slow) diagnosis.
    """
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    _check_header(path, expected)
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", engine="c", skip_blank_lines=True)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        raise DataError(_first_problem(path, expected)) from None
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows after the header")
    if not all(dtype.kind in "iu" for dtype in frame.dtypes):
        raise DataError(_first_problem(path, expected))
    values = frame.to_numpy(dtype=np.int64)
    limits = np.array([_upper_limit(c) for c in expected])
    bad = (values < 0) | (values > limits)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: line {row + 2}, column {expected[col]}: "
            f"{values[row, col]} is outside 0-{limits[col]}"
        )
    return values


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_csv_cached(path: Path, expected: list[str]) -> np.ndarray:
    """`read_csv`, with a binary cache keyed by the file's bytes beside the file.

    A cache entry is only written after validation succeeded, so loading one
    needs no new checks beyond its shape; a damaged entry is ignored.
    """
    values, pending = read_csv_caching(path, expected)
    write_cache(pending)
    return values


def read_csv_caching(path: Path, expected: list[str]) -> tuple[np.ndarray, tuple | None]:
    """The values from the cache or the file, and the cache entry still to write (or None).

    The entry is handed back rather than written so that a directory is checked whole
    before anything lands in it: a good train.csv beside a bad test.csv leaves no cache.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    key = _file_digest(path)
    cache = path.parent / CACHE_DIR_NAME / f"{path.stem}-v{CACHE_VERSION}-{key[:32]}.npy"
    try:
        values = np.load(cache, allow_pickle=False)
        if values.ndim == 2 and values.shape[1] == len(expected) and values.dtype == np.uint8:
            return values.astype(np.int64), None
    except (OSError, ValueError):
        pass
    values = read_csv(path, expected)
    return values, (cache, values)


def write_cache(pending: tuple | None) -> None:
    if pending is None:
        return
    cache, values = pending
    try:
        osutil.atomic_write(cache, _npy_bytes(values.astype(np.uint8)))
    except OSError:
        pass  # a read-only data directory only loses the cache


def _npy_bytes(array: np.ndarray) -> bytes:

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_int_csv(path: Path, header: list[str], values: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        np.savetxt(f, values, fmt="%d", delimiter=",")
