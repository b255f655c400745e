"""The recipe study's summary (benchmarks/studies/recipes.py), on hand-made run files: the
default search's start and ranges are set by what it reports, so its arithmetic is checked
here."""

import json

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def recipes():
    return load_benchmark("studies/recipes")


def write_run(out, arm, seed, predicted, labels, val_ce=0.1):
    """A finished run whose holdout predictions are `predicted` (one-hot)."""
    probabilities = np.eye(10, dtype=np.float16)[predicted]
    np.save(out / f"{arm}__{seed}.npy", probabilities)
    record = {"arm": arm, "seed": seed, "holdout": float(np.mean(predicted == labels)),
              "val_crossentropy": val_ce, "seconds": 1.0}
    (out / f"{arm}__{seed}.json").write_text(json.dumps(record))


REF, MORE = "dropout0.3_conv0", "dropout0.3_conv0_val0.05"


def test_gains_are_paired_with_the_named_arm_and_three_averaged_counts_draws(tmp_path, recipes):
    labels = np.arange(1000) % 10
    wrong = (labels + 1) % 10
    # REF: each seed misses the same first 20 images -> 98.0%, and so does any average.
    # MORE: seed s misses 10 images of its own -> 99.0% alone; three of them averaged
    # out-vote every miss (each image is wrong in one model of three) -> 100%.
    for seed in (1, 2, 3):
        ref = labels.copy()
        ref[:20] = wrong[:20]
        write_run(tmp_path, REF, seed, ref, labels, val_ce=0.1 * seed)
        more = labels.copy()
        own = slice(100 * seed, 100 * seed + 10)
        more[own] = wrong[own]
        write_run(tmp_path, MORE, seed, more, labels)

    s = recipes.summary(tmp_path, [REF, MORE], labels, against=REF)
    rows = {r["arm"]: r for r in s["arms"]}

    assert s["against"] == REF and rows[REF]["gain"] is None
    assert rows[MORE]["gain"] == pytest.approx(1.0)
    assert rows[MORE]["gain_se"] == pytest.approx(0.0)
    assert rows[REF]["mean"] == pytest.approx(98.0) and rows[MORE]["mean"] == pytest.approx(99.0)
    assert rows[REF]["three_averaged_mean"] == pytest.approx(98.0)
    assert rows[REF]["three_averaged_at_least_99.2"] == 0.0
    assert rows[MORE]["three_averaged_mean"] == pytest.approx(100.0)
    assert rows[MORE]["three_averaged_at_least_99.2"] == 1.0
    assert rows[MORE]["all_averaged"] == pytest.approx(100.0)
    # 20 images are wrong in the three REF runs, half of the six
    assert s["images_wrong_in_half_of_the_models"] == 20
    # REF's runs differ in validation cross-entropy but not on the holdout: no correlation
    assert s["corr_val_crossentropy_holdout"] is None


def test_an_arm_with_fewer_than_three_runs_has_no_three_averaged(tmp_path, recipes):
    labels = np.arange(1000) % 10
    for seed in (1, 2):
        write_run(tmp_path, REF, seed, labels, labels)
    (tmp_path / "settings.json").write_text('{"epochs": 40, "set": {}}')  # not a run
    (row,) = recipes.summary(tmp_path, [REF], labels, against=REF)["arms"]
    assert row["runs"] == 2 and row["three_averaged_mean"] is None


def test_an_out_folder_keeps_one_setting(tmp_path, capsys):
    common = load_benchmark("common")
    common.claim(tmp_path, {"epochs": 40, "set": {}})
    common.claim(tmp_path, {"epochs": 40, "set": {}})  # the same study, resumed
    with pytest.raises(SystemExit) as stopped:
        common.claim(tmp_path, {"epochs": 20, "set": {}})
    assert stopped.value.code == 2
    assert '"epochs": 40' in capsys.readouterr().err
    assert json.loads((tmp_path / "settings.json").read_text()) == {"epochs": 40, "set": {}}
