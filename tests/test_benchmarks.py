"""The benchmark table's cheap groups run against the package as it is now, so that a
renamed function breaks a test here rather than CI's quick benchmark run at the very end."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.subprocess
def test_quick_data_and_reject_rows_are_measured(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick",
                           "--only", "data,reject", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["group"] for r in rows} == {"data loading", "reject malformed train.csv"}
    assert all(isinstance(r["value"], float) and r["value"] > 0 for r in rows), rows


class _NeverBuilt:
    """Stands for the held-back third part: unpickling it fails the test."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise AssertionError("the third part of the pickle was decoded")


def test_the_kaggle_size_builder_reads_two_parts_and_never_the_third(tmp_path, monkeypatch):
    import gzip
    import pickle

    import numpy as np

    from tests.conftest import load_benchmark

    builder = load_benchmark("kaggle_data")
    rng = np.random.default_rng(0)

    def part(n: int):
        pixels = rng.integers(0, 256, size=(n, 784))
        return (pixels / 256).astype(np.float32), rng.integers(0, 10, size=n)

    train, validation = part(40), part(20)
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump((train, validation, (_NeverBuilt(), _NeverBuilt())), f, protocol=2)
    images, labels = builder.read_train_and_validation(path)
    # value/256 back to the integers 0-255 exactly, both parts in order
    np.testing.assert_array_equal(images[:40], np.rint(train[0] * 256))
    np.testing.assert_array_equal(labels, np.concatenate([train[1], validation[1]]))
    monkeypatch.setattr(builder, "TRAIN_ROWS", 42)
    monkeypatch.setattr(builder, "TEST_ROWS", 18)
    builder.write(tmp_path / "out", images, labels)
    from digitlab import data

    built = data.load(tmp_path / "out")
    assert (len(built.train_labels), len(built.test_labels)) == (42, 18)
    assert sorted(np.concatenate([built.train_labels, built.test_labels]).tolist()) == sorted(labels.tolist())
