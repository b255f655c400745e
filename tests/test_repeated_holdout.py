"""The third kind of validation, a repeated stratified holdout, end to end from a search
file: trials scored on what their splits held out, promote, submit."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, submission, validation
from tests.conftest import TINY_SPACE, study_name

REPEATED_SPACE = TINY_SPACE.replace(
    "budget: {trials: 3, max_epochs: 2}",
    "budget: {trials: 2, max_epochs: 1}\nvalidation: {kind: repeated, repeats: 2, fraction: 0.2}")


def test_splits_are_stratified_different_and_drawn_from_the_seed():
    labels = np.repeat(np.arange(10), 30)
    scheme = validation.RepeatedHoldout(3, 0.2, seed=5)
    splits = scheme.splits(labels)
    assert len(splits) == 3
    for train_rows, held in splits:
        assert not set(train_rows) & set(held) and len(train_rows) + len(held) == 300
        assert np.bincount(labels[held]).tolist() == [6] * 10  # each digit keeps its share
    assert not np.array_equal(splits[0][1], splits[1][1])
    again = validation.RepeatedHoldout(3, 0.2, seed=5).splits(labels)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))


def test_a_repeated_holdout_study_searches_promotes_and_submits(workdir, tiny_dir, capsys):
    path = workdir / "repeated.yaml"
    path.write_text(REPEATED_SPACE)
    assert cli.main(["search", "--space", str(path), "--data-dir", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "oof_accuracy (2 holdouts of 0.2)" in out
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    trials = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                filter_string="tags.trial_number LIKE '%'")
    assert len(trials) == 2
    parent = MlflowClient().get_run(trials[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["search_study"] == study_name("repeated-optuna-2x0.2", tiny_dir)  # its own
    assert "--validation repeated:repeats=2,fraction=0.2" in parent.data.tags["reproduce"]
    for run in trials:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["validation"] == "repeated" and tags["validation_repeats"] == "2"
        assert metrics["objective"] == metrics["oof_accuracy"]
        assert sorted(m.name for m in mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")) == ["fold_1", "fold_2"]

    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    best = next(r for r in trials if r.info.run_id == version.tags["members"])
    assert version.tags["ensemble_members"] == "2" and version.tags["validation"] == "repeated"
    # scored again through the served models, on the same held-out images
    assert float(version.tags["val_accuracy"]) == pytest.approx(best.data.metrics["oof_accuracy"], abs=1e-6)
    assert "2 holdouts of 0.2, scored out of fold" in version.description

    csv = workdir / "submissions" / "repeated.csv"
    assert cli.main(["submit", "--data-dir", str(tiny_dir), "--output", str(csv)]) == 0
    assert submission.score(csv, tiny_dir / "solution.csv") == pytest.approx(
        float(version.tags["holdout_accuracy"]))


def test_the_option_replaces_the_files_validation(workdir, tiny_dir, capsys):
    path = workdir / "plain.yaml"
    path.write_text(TINY_SPACE)
    assert cli.main(["search", "--space", str(path), "--data-dir", str(tiny_dir), "--trials", "1",
                     "--validation", "repeated:repeats=1,fraction=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["digitlab: error: --validation repeated:repeats=1,fraction=0.2: validation.repeats "
                   "must be a whole number of at least 2"]
