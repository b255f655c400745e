"""K-fold validation end to end on tiny real data: trials scored out of fold, their fold
models promoted as one averaged version, submitted, and a study killed mid-fold resumed."""

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, submission
from digitlab.search import trial as trial_mod
from digitlab.validation import kfold as folds
from tests.conftest import TINY_SPACE, kill_during_trial, study_name

KFOLD_SPACE = TINY_SPACE.replace("budget: {trials: 3, max_epochs: 2}",
                                 "budget: {trials: 2, max_epochs: 1}\nvalidation: {folds: 3}")


@pytest.fixture
def kfold_file(workdir):
    path = workdir / "kfold.yaml"
    path.write_text(KFOLD_SPACE)
    return path


def trial_runs():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    found = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                               filter_string="tags.trial_number LIKE '%'")
    return sorted(found, key=lambda r: int(r.data.tags["trial_number"]))


def logged_model_names(run_id):
    return sorted(m.name for m in mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run_id}'", output_format="list"))


def test_folds_are_stratified_disjoint_and_drawn_from_the_seed():
    labels = np.repeat(np.arange(10), [30, 31, 29, 30, 30, 33, 30, 28, 30, 30])
    fold = folds.assign(labels, 3, seed=42)
    assert set(fold.tolist()) == {0, 1, 2}  # every image in exactly one fold
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1
    for c in range(10):  # each digit spread evenly over the folds
        per_fold = np.bincount(fold[labels == c], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1
    np.testing.assert_array_equal(fold, folds.assign(labels, 3, seed=42))  # every trial alike
    assert not np.array_equal(fold, folds.assign(labels, 3, seed=7))


@pytest.mark.parametrize("engine", ["optuna", "kerastuner"])
def test_a_kfold_study_is_scored_out_of_fold_and_promotes_its_fold_models(
        engine, kfold_file, tiny_dir, workdir, capsys):
    args = ["search", "--space", str(kfold_file), "--data-dir", str(tiny_dir), "--engine", engine]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "trial-1 split 2/3" in captured.err  # the progress shows the fold being trained
    assert "oof_accuracy (3-fold)" in captured.out
    trials = trial_runs()
    assert len(trials) == 2  # one run per trial, whatever the folds
    client = MlflowClient()
    for run in trials:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["validation_folds"] == "3" and tags["trial_state"] == "COMPLETE"
        assert tags["mlflow.parentRunId"]  # nested under the search, as any trial
        assert 0 <= metrics["oof_accuracy"] <= 1 and metrics["oof_crossentropy"] > 0
        assert metrics["objective"] == metrics["oof_accuracy"]
        for i in (1, 2, 3):  # each fold's curve, step = epoch
            history = client.get_metric_history(run.info.run_id, f"fold{i}_val_accuracy")
            assert [m.step for m in history] == [1]
        assert logged_model_names(run.info.run_id) == ["fold_1", "fold_2", "fold_3"]
        # the run records the folds, not the single split it did not use
        assert "validation_fraction" not in tags and tags["split_seed"]
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "holdout"}
        assert json.loads(contexts["training"].profile)["features_shape"][0] == 300  # every labelled image

    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    best = max(trials, key=lambda r: (r.data.metrics["objective"],
                                      -r.data.metrics["val_crossentropy_final_model"]))
    assert version.tags["members"] == best.info.run_id
    assert version.tags["ensemble_members"] == "3"
    # its validation accuracy is the trial's out-of-fold accuracy, measured again through
    # the fold models as they are served
    assert float(version.tags["val_accuracy"]) == pytest.approx(best.data.metrics["oof_accuracy"],
                                                                abs=1e-6)
    assert "3-fold, scored out of fold" in version.description

    out = workdir / "submissions" / "kfold.csv"
    assert cli.main(["submit", "--data-dir", str(tiny_dir), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 51
    assert submission.score(out, tiny_dir / "solution.csv") == pytest.approx(
        float(version.tags["holdout_accuracy"]))
    # the trial's holdout accuracy is its fold ensemble's, the model promote registered
    assert float(version.tags["holdout_accuracy"]) == pytest.approx(
        best.data.metrics["holdout_accuracy"], abs=1e-6)

    if engine == "optuna":  # an ensemble of K-fold trials averages every fold model, with TTA
        assert cli.main(["promote", "--data-dir", str(tiny_dir), "--ensemble", "2", "--tta",
                         "--force"]) == 0
        version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
        assert version.tags["ensemble_members"] == "6" and version.tags["tta"] == "true"
        assert cli.main(["submit", "--data-dir", str(tiny_dir), "--output", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 51


def test_a_pruned_kfold_trial_trains_no_further_fold(workdir, tiny_dir, kfold_file):
    from digitlab import data, store
    from digitlab.search import search_file

    store.configure()
    experiment_id = mlflow.get_experiment_by_name("digit-recognizer").experiment_id
    parent = MlflowClient().create_run(experiment_id).info.run_id
    outcome = trial_mod.run_trial(
        search_file.load(kfold_file), {"model.dropout": 0.2, "optimizer.learning_rate": 0.003},
        data=data.load(tiny_dir), seed=1, engine="optuna", number=0, parent_run_id=parent,
        experiment_id=experiment_id, report=lambda step, value: True,  # prune after epoch 1
    )
    assert outcome.state == trial_mod.PRUNED
    run = MlflowClient().get_run(outcome.run_id)
    assert "fold1_val_accuracy" in run.data.metrics
    assert "fold2_val_accuracy" not in run.data.metrics and "oof_accuracy" not in run.data.metrics
    assert logged_model_names(outcome.run_id) == []


@pytest.mark.parametrize("option, content, message", [
    (["--folds", "1"], KFOLD_SPACE, "--folds must be at least 2"),
    ([], KFOLD_SPACE.replace("folds: 3", "folds: 1"), "validation.folds must be a whole number"),
    ([], KFOLD_SPACE.replace("folds: 3", "k: 3"), "validation: unknown key 'k'"),
    (["--folds", "3"], TINY_SPACE.replace("metric: val_accuracy", "metric: val_loss")
     .replace("maximize", "minimize"), "objective.metric must be val_accuracy or val_crossentropy"),
    (["--folds", "31"], TINY_SPACE, "digit 0 has 30 training images; 31-fold validation"),
])
def test_bad_folds_are_one_line_errors_before_anything_exists(
        option, content, message, workdir, tiny_dir, capsys):
    path = workdir / "bad.yaml"
    path.write_text(content)
    assert cli.main(["search", "--space", str(path), "--data-dir", str(tiny_dir), *option]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path("optuna.journal").exists() and not Path("mlflow.db").exists()


def test_folds_on_the_command_line_make_a_study_of_their_own(workdir, tiny_dir):
    from digitlab import search
    from digitlab.validation import Holdout, KFold

    path = workdir / "space.yaml"
    path.write_text(TINY_SPACE)
    single = search.make_settings(str(path))
    kfold = search.make_settings(str(path), validation={"kind": "kfold", "folds": 3})
    assert (single.validation, kfold.validation) == (Holdout(), KFold(3))
    assert single.study == "space-optuna" and kfold.study == "space-optuna-3fold"
    assert single.study_file.fingerprint() != kfold.study_file.fingerprint()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["optuna", "kerastuner"])
def test_sigkill_in_the_middle_of_a_fold_then_resume(engine, workdir, tiny_dir):
    path = workdir / "kfold.yaml"
    path.write_text(KFOLD_SPACE.replace("max_epochs: 1", "max_epochs: 2"))
    args = ["search", "--space", str(path), "--data-dir", str(tiny_dir), "--engine", engine]
    kill_during_trial(args, workdir, "trial-1 split 2/3")  # after fold 2's first of two epochs
    (interrupted,) = [r for r in trial_runs() if r.info.status == "RUNNING"]
    metrics = interrupted.data.metrics  # killed after fold 2's first epoch
    assert "fold2_val_accuracy" in metrics and "fold3_val_accuracy" not in metrics

    assert cli.main(args) == 0
    trials = trial_runs()
    by_id = {r.info.run_id: r for r in trials}
    assert by_id[interrupted.info.run_id].info.status == "KILLED"
    assert by_id[interrupted.info.run_id].data.tags["trial_state"] == "FAIL"
    assert not [r for r in trials if r.info.status == "RUNNING"]
    completed = [r for r in trials if r.data.tags["trial_state"] == "COMPLETE"]
    assert len(completed) == 2  # the budget, a K-fold trial counting as one
    assert len(trials) == 3  # one run per trial attempt: the two trials and the interrupted one
    for run in completed:
        assert logged_model_names(run.info.run_id) == ["fold_1", "fold_2", "fold_3"]
        assert "oof_accuracy" in run.data.metrics


@pytest.mark.subprocess
def test_mlflow_run_search_takes_folds(workdir, tiny_dir):
    from tests.test_mlproject import mlflow_run

    path = workdir / "space.yaml"
    path.write_text(TINY_SPACE)
    proc = mlflow_run(workdir, "search", f"space={path}", "trials=1", "max_epochs=1", "folds=2",
                      f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = trial_runs()
    assert trial.data.tags["validation_folds"] == "2" and "oof_accuracy" in trial.data.metrics
    parent = MlflowClient().get_run(trial.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == study_name("space-optuna-2fold", tiny_dir)
