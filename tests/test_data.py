import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from digitlab import cli, data
from digitlab.errors import DataError

rng = np.random.default_rng(1)
TRAIN_ROWS = np.column_stack([np.arange(20) % 10, rng.integers(0, 256, (20, 784))])
TEST_ROWS = rng.integers(0, 256, (5, 784))


def csv_text(header, rows, newline="\n"):
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    return newline.join(lines) + newline


def make_dir(root: Path, train: str | None = None, test: str | None = None) -> Path:
    d = root / "kaggle"
    d.mkdir()
    (d / "train.csv").write_text(train if train is not None else csv_text(data.TRAIN_HEADER, TRAIN_ROWS))
    (d / "test.csv").write_text(test if test is not None else csv_text(data.PIXEL_COLUMNS, TEST_ROWS))
    return d


def good_train():
    return csv_text(data.TRAIN_HEADER, TRAIN_ROWS)


def replace_cell(text: str, line: int, column: int, value: str) -> str:
    lines = text.split("\n")
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)
    return "\n".join(lines)


def drop_last_cells(text: str, line: int, n: int) -> str:
    lines = text.split("\n")
    lines[line - 1] = ",".join(lines[line - 1].split(",")[:-n])
    return "\n".join(lines)


def header_with(names):
    rows = "\n".join(",".join(str(v) for v in row) for row in TRAIN_ROWS)
    return ",".join(names) + "\n" + rows + "\n"


BAD_TRAIN = {
    "missing column": (
        ",".join(data.TRAIN_HEADER[:-1]) + "\n" + "\n".join(",".join(map(str, r[:-1])) for r in TRAIN_ROWS) + "\n",
        "line 1: missing column 'pixel783'",
    ),
    "extra column": (header_with([*data.TRAIN_HEADER, "extra"]), "line 1, column 786: extra column 'extra'"),
    "misnamed column": (
        header_with([*data.TRAIN_HEADER[:6], "pixl5", *data.TRAIN_HEADER[7:]]),
        "line 1, column 7: unexpected column 'pixl5'",
    ),
    "duplicated column": (
        header_with([*data.TRAIN_HEADER[:7], "pixel5", *data.TRAIN_HEADER[8:]]),
        "line 1, column pixel5: duplicated column",
    ),
    "no header": ("\n".join(",".join(map(str, r)) for r in TRAIN_ROWS) + "\n", "line 1: no header"),
    "ragged row, too many": (replace_cell(good_train(), 4, 10, "1,2"), "line 4, column 786: extra field"),
    "ragged row, too few": (drop_last_cells(good_train(), 5, 2), "line 5, column pixel782: missing"),
    "non-integer": (replace_cell(good_train(), 3, 100, "1.5"), "line 3, column pixel99: '1.5' is not an integer"),
    "non-numeric": (replace_cell(good_train(), 7, 5, "abc"), "line 7, column pixel4: 'abc' is not a number"),
    "empty cell": (replace_cell(good_train(), 9, 300, ""), "line 9, column pixel299: empty cell"),
    "pixel too large": (replace_cell(good_train(), 2, 784, "256"), "line 2, column pixel783: 256 is outside 0-255"),
    "negative pixel": (replace_cell(good_train(), 21, 1, "-1"), "line 21, column pixel0: -1 is outside 0-255"),
    "label outside 0-9": (replace_cell(good_train(), 6, 0, "10"), "line 6, column label: 10 is outside 0-9"),
    "empty file": ("", "train.csv: file is empty"),
    "header only": (",".join(data.TRAIN_HEADER) + "\n", "train.csv: no data rows after the header"),
    "cut off mid-row": (good_train()[:-1000], "line 21, column pixel.*: file is cut off mid-row"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_csv_exits_2_with_one_line_and_creates_nothing(case, workdir, capsys):
    text, message = BAD_TRAIN[case]
    d = make_dir(workdir, train=text)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code = cli.main(["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(d)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "train.csv" in err
    assert re.search(message, err), err
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert after == before  # no mlflow.db, no cache, no run


def test_label_column_in_test_csv_is_an_error(workdir, capsys):
    test = csv_text(data.TRAIN_HEADER, TRAIN_ROWS[:3])
    d = make_dir(workdir, test=test)
    assert cli.main(["train", "--experiment", "dnn", "--data-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert "test.csv: line 1, column label: test.csv must not have a label column" in err
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize("variant", ["bom", "crlf", "trailing blank line"])
def test_tolerated_variants_load(variant, tmp_path):
    text = csv_text(data.TRAIN_HEADER, TRAIN_ROWS, newline="\r\n" if variant == "crlf" else "\n")
    if variant == "bom":
        text = "\ufeff" + text
    if variant == "trailing blank line":
        text += "\n"
    d = make_dir(tmp_path, train=text)
    loaded = data.load(d)
    assert loaded.train_images.shape == (20, 28, 28, 1)
    assert loaded.train_images.dtype == np.float32
    np.testing.assert_array_equal(loaded.train_labels, TRAIN_ROWS[:, 0])
    np.testing.assert_allclose(loaded.train_images.reshape(20, -1) * 255, TRAIN_ROWS[:, 1:], atol=1e-3)


def test_same_content_same_digest_whatever_the_line_ends(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = data.load(make_dir(tmp_path / "a"))
    b = data.load(make_dir(tmp_path / "b", train=csv_text(data.TRAIN_HEADER, TRAIN_ROWS, "\r\n")))
    assert a.digest == b.digest


def test_cache_is_keyed_by_content(tmp_path):
    d = make_dir(tmp_path)
    first = data.load(d)
    caches = sorted((d / data.CACHE_DIR_NAME).glob("*.npy"))
    assert [p.name.split("-")[0] for p in caches] == ["test", "train"]
    again = data.load(d)
    np.testing.assert_array_equal(first.train_images, again.train_images)
    assert first.digest == again.digest
    # change one pixel: the old cache entry must not be used
    (d / "train.csv").write_text(replace_cell(good_train(), 2, 1, "7"))
    changed = data.load(d)
    assert changed.train_images[0].ravel()[0] == pytest.approx(7 / 255)
    assert changed.digest != first.digest


def test_damaged_cache_is_ignored(tmp_path):
    d = make_dir(tmp_path)
    first = data.load(d)
    for cache in (d / data.CACHE_DIR_NAME).glob("*.npy"):
        cache.write_bytes(b"garbage")
    np.testing.assert_array_equal(data.load(d).train_images, first.train_images)


def test_embedded_default_is_a_stratified_kaggle_layout(embedded_dir):
    loaded = data.load(embedded_dir)
    assert loaded.train_images.shape == (4000, 28, 28, 1)
    assert loaded.test_images.shape == (1000, 28, 28, 1)
    assert np.bincount(loaded.train_labels).tolist() == [400] * 10
    assert np.bincount(loaded.test_labels).tolist() == [100] * 10
    assert 0.0 <= loaded.train_images.min() and loaded.train_images.max() <= 1.0
    header = (embedded_dir / "solution.csv").read_text().splitlines()[0]
    assert header == "ImageId,Label"


def test_embedded_default_is_reproducible(embedded_dir, tmp_path):
    again = data.write_embedded(tmp_path / "again")
    for name in ("train.csv", "test.csv", "solution.csv"):
        assert (again / name).read_bytes() == (embedded_dir / name).read_bytes()


def test_default_directory_is_written_on_first_use(workdir):
    loaded = data.load()
    assert (workdir / "data" / "digit-recognizer" / "train.csv").exists()
    assert len(loaded.train_labels) == 4000


def test_data_command_writes_and_checks(workdir, capsys):
    assert cli.main(["data"]) == 0
    out = capsys.readouterr().out
    assert "4000 training images" in out and "1000 test images with solution" in out
    assert cli.main(["data"]) == 0  # second time: checks the existing directory


def test_a_missing_folder_the_user_named_gets_no_demo(workdir, capsys):
    typo = workdir / "kagle" / "digit-recognizer"
    assert cli.main(["data", "--data-dir", str(typo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"digitlab: error: {typo}: data directory not found (nothing written); --demo "
                   "writes the embedded MNIST subset there"]
    assert not (workdir / "kagle").exists()
    # asked for: the demo goes there, and only into a new folder
    assert cli.main(["data", "--data-dir", str(typo), "--demo"]) == 0
    assert "4000 training images" in capsys.readouterr().out
    assert cli.main(["data", "--data-dir", str(typo), "--demo"]) == 2


def test_split_is_stratified_and_seeded(embedded_dir):
    loaded = data.load(embedded_dir)
    a = data.split(loaded, 0.1, seed=3)
    b = data.split(loaded, 0.1, seed=3)
    c = data.split(loaded, 0.1, seed=4)
    assert np.bincount(a.val_labels).tolist() == [40] * 10
    assert len(a.train_labels) == 3600
    np.testing.assert_array_equal(a.val_labels, b.val_labels)
    np.testing.assert_array_equal(a.val_images, b.val_images)
    assert not np.array_equal(a.val_images, c.val_images)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_loads(tmp_path, compress):
    images = rng.integers(0, 256, (12, 28, 28))
    labels = np.arange(12) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:4], compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:4], compress)
    loaded = data.load(tmp_path)
    assert loaded.train_images.shape == (12, 28, 28, 1)
    np.testing.assert_array_equal(loaded.train_labels, labels)
    np.testing.assert_array_equal(loaded.test_labels, labels[:4])
    np.testing.assert_allclose(loaded.test_images[..., 0] * 255, images[:4], atol=1e-3)


def test_idx_count_mismatch_is_an_error(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)), False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4), False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)), False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 4 labels for 5 images"):
        data.load(tmp_path)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        data.load(tmp_path / "nope")


def test_the_embedded_digest_is_what_write_embedded_writes(embedded_dir):
    assert data.load(embedded_dir).digest == data.EMBEDDED_DIGEST
