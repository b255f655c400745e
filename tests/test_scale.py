"""Training length in images, subset rungs, the budget's plan and refit on every labelled
image: on tiny real data, real Keras training, a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, config, data, runtime, stream, train
from tests.conftest import TINY_SPACE, kill_during_trial, study_name

# 300 labelled rows, 10% validate: 270 training images. Epochs of 64 images; the first one
# on 100 of them; a refit when the search ends.
STUDY = TINY_SPACE.replace(
    "budget: {trials: 3, max_epochs: 2}",
    "budget: {trials: 3, max_epochs: 3, epoch_images: 64, subset_images: 100, subset_epochs: 1}\n"
    "refit: true",
).replace("pruner: none", "pruner: hyperband")
TRAIN_IMAGES, SUBSET, EPOCH = 270, 100, 64


def tiny_training(**changes):
    base = config.TrainingConfig(epochs=4, batch_size=16, epoch_images=EPOCH, subset_images=SUBSET,
                                 subset_epochs=2)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_a_subset_rung_trains_on_the_stated_number_of_images(tiny_dir):
    split = data.split(data.load(tiny_dir), 0.1, seed=3)
    labels = split.train_labels
    feed = stream.feed(labels, tiny_training(), seed=11, split_seed=3)
    assert feed.steps_per_epoch == EPOCH // 16 and len(feed.order) == 4 * EPOCH
    first, rest = feed.order[: 2 * EPOCH], feed.order[2 * EPOCH :]
    # The subset epochs draw from exactly SUBSET images, every digit in its share.
    subset = stream.stratified_subset(labels, SUBSET, 3)
    assert len(subset) == SUBSET and set(first) <= set(subset.tolist())
    np.testing.assert_array_equal(np.bincount(labels[subset]), [10] * 10)
    assert len(set(rest.tolist()) - set(subset.tolist())) > 0  # then all of them
    assert feed.pool(2) == SUBSET and feed.pool(3) == len(labels)
    # Every trial of a study (its own seed, the study's split seed) gets the same subset.
    other = stream.feed(labels, tiny_training(), seed=12, split_seed=3)
    assert set(other.order[: 2 * EPOCH].tolist()) <= set(subset.tolist())
    assert not np.array_equal(other.order, feed.order)

    # The backend is fed the feed's rows in its order.
    split.train_images[:, 0, 0, 0] = np.arange(len(labels))
    fed = train.training_batches(split, 16, 11, feed)
    assert fed["steps_per_epoch"] == feed.steps_per_epoch
    batches = iter(fed["x"])
    rows = []
    for _ in range(2 * feed.steps_per_epoch):
        images, y = next(batches)
        images = np.asarray(images) if runtime.backend() != "tensorflow" else images.numpy()
        rows.append(images[:, 0, 0, 0].astype(int))
    np.testing.assert_array_equal(np.concatenate(rows), first)


def test_a_run_counts_its_epochs_in_images(tiny_dir):
    cfg = config.load_experiment("basic_cnn", {
        "model.blocks.0.filters": [4, 8], "model.dense_units": [16], "training.epochs": 3,
        "training.batch_size": 32, "training.epoch_images": 96, "training.subset_images": SUBSET,
        "training.subset_epochs": 2})
    result = train.run(cfg, data.load(tiny_dir), verbose=0)
    assert result.epochs_trained == 3
    assert result.images_seen == 3 * 96 and result.history["images_seen"] == [96.0, 192.0, 288.0]
    assert result.subset_size == TRAIN_IMAGES  # it trained past the subset epochs
    assert len(result.epoch_seconds) == 3


def test_subset_needs_epochs_of_fixed_size():
    with pytest.raises(config.ConfigError, match="subset_images needs training.epoch_images"):
        config.load_experiment("basic_cnn", {"training.subset_images": 100, "training.subset_epochs": 1})


@pytest.fixture
def refitted(workdir, tiny_dir, capsys):
    """A search with subset rungs and `refit: true`, and what it printed."""
    (workdir / "study.yaml").write_text(STUDY)
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    return capsys.readouterr()


def children(parent_id: str):
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digit-recognizer").experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_trials_record_their_fidelity_and_a_refit_trains_on_every_labelled_image(refitted, tiny_dir, capsys):
    assert refitted.err.splitlines()[0].startswith(
        "plan: trials until the trial budget is spent, a full trial (3 epochs of 64 images, from "
        "270 training images) about")
    client = MlflowClient()
    search = client.search_runs([client.get_experiment_by_name("digit-recognizer").experiment_id],
                                f"tags.search_study = '{study_name('study-optuna', tiny_dir)}'")[0]
    assert search.data.tags["budget_plan"].startswith("plan: trials until")
    trials = [r for r in children(search.info.run_id) if "trial_number" in r.data.tags]
    assert len(trials) == 3
    for t in trials:  # fidelity reached: images seen, and the images they came from
        m = t.data.metrics
        assert m["images_seen"] == m["epochs_trained"] * EPOCH
        assert m["subset_size"] == (SUBSET if m["epochs_trained"] <= 1 else TRAIN_IMAGES)

    best_id = search.data.tags["best_run_id"]
    (refit,) = children(best_id)
    assert f"refitted trial {search.data.tags['best_trial_number']} on every labelled image: " \
           f"MLflow run {refit.info.run_id}" in refitted.out
    assert "next: digitlab promote --refit" in refitted.out
    tags, metrics = refit.data.tags, refit.data.metrics
    assert tags["refit_of"] == best_id and tags["trial_number"] == search.data.tags["best_trial_number"]
    assert refit.info.status == "FINISHED" and "validation_fraction" not in tags
    # Training plus validation images: all 300 labelled, for the trial's own length.
    best = client.get_run(best_id)
    assert metrics["subset_size"] == 300 and metrics["epochs_trained"] == best.data.metrics["epochs_trained"]
    assert "val_accuracy" not in metrics
    contexts = {i.tags[0].value for i in refit.inputs.dataset_inputs}
    assert contexts == {"training", "holdout"}

    # promote --refit registers that run (no second refit), through the gate and aliases
    assert cli.main(["promote", "--refit", "--data-dir", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "version 1 is now production" in out
    assert len(children(best_id)) == 1  # the same refit, not a second one
    (serving,) = children(refit.info.run_id)  # the version's run, under the model it serves
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["members"] == refit.info.run_id and version.tags["refit"] == "true"
    assert version.run_id == serving.info.run_id
    assert float(version.tags["val_accuracy"]) == pytest.approx(best.data.metrics["val_accuracy_final_model"])
    assert "trained on all 300 labelled images for 3 epochs" in version.description
    assert cli.main(["submit", "--data-dir", str(tiny_dir)]) == 0


def test_the_gate_names_what_a_refit_is_compared_on(workdir, tiny_dir, capsys):
    (workdir / "study.yaml").write_text(STUDY.replace("refit: true", "").replace("pruner: hyperband",
                                                                               "pruner: none"))
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    # production is the top two averaged: a refit of the best alone is another model
    assert cli.main(["promote", "--ensemble", "2", "--data-dir", str(tiny_dir)]) == 0
    # production without a holdout score: the gate cannot compare holdout accuracy
    MlflowClient().delete_model_version_tag("digit-recognizer", "1", "holdout_accuracy")
    capsys.readouterr()
    assert cli.main(["promote", "--refit", "--min-delta", "1", "--data-dir", str(tiny_dir)]) == 3
    out = capsys.readouterr().out
    assert "val_accuracy of its source trials (a refit has no validation images left)" in out
    assert "aliases unchanged" in out


def test_refit_of_a_run_whose_configuration_is_gone_is_one_line(workdir, tiny_dir, capsys):
    (workdir / "study.yaml").write_text(STUDY.replace("refit: true", ""))
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digit-recognizer").experiment_id
    trial = next(r for r in client.search_runs([experiment], "tags.trial_state = 'COMPLETE'"))
    local = Path(mlflow.artifacts.download_artifacts(run_id=trial.info.run_id, artifact_path="config.yaml"))
    stored = Path(trial.info.artifact_uri.removeprefix("file://")) / "config.yaml"
    assert stored.read_text() == local.read_text()
    stored.unlink()
    before = len(client.search_runs([experiment]))
    capsys.readouterr()
    assert cli.main(["promote", "--refit", "--run", trial.info.run_id, "--data-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configuration cannot be rebuilt" in err[0] and trial.info.run_id in err[0]
    assert len(client.search_runs([experiment])) == before  # no run created
    assert not client.search_registered_models()  # nothing registered, no alias


def test_a_refit_rebuilds_the_trials_own_configuration_without_its_experiment_file(workdir, tiny_dir):
    """The trial's config.yaml is what it trained: a user's experiment file that has since
    gone (or changed) does not stop a refit."""
    (workdir / "experiments").mkdir()
    (workdir / "experiments" / "mine.yaml").write_text(
        "model:\n  blocks: [{filters: [6, 12], kernel_size: 3, pool: max}]\n  dense_units: [24]\n")
    study = STUDY.replace("refit: true", "").replace("experiments: [basic_cnn]", "experiments: [mine]")
    (workdir / "study.yaml").write_text(study.replace("model.blocks.0.filters: [8, 16]", "model.l2: 0.0"))
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    (workdir / "experiments" / "mine.yaml").unlink()
    assert cli.main(["promote", "--refit", "--data-dir", str(tiny_dir)]) == 0
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    refit = MlflowClient().get_run(version.tags["members"])
    assert refit.data.tags["experiment"] == "mine" and "'filters': [6, 12]" in refit.data.params["model.blocks"]


@pytest.mark.slow
def test_kill_during_a_refit_moves_no_alias_and_the_next_promote_works(workdir, tiny_dir):
    (workdir / "study.yaml").write_text(STUDY.replace("refit: true", "").replace("max_epochs: 3", "max_epochs: 6"))
    env = {**os.environ}
    run = [sys.executable, "-m", "digitlab"]
    subprocess.run([*run, "search", "--space", "study.yaml", "--data-dir", str(tiny_dir)], check=True,
                   env=env, capture_output=True)
    subprocess.run([*run, "promote", "--data-dir", str(tiny_dir)], check=True, env=env, capture_output=True)
    kill_during_trial(["promote", "--refit", "--force", "--data-dir", str(tiny_dir)], workdir, "refit trial-",
                      epoch_line="accuracy:")  # a refit validates on nothing
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this test's store, not an earlier one's
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("digit-recognizer", "production").version) == "1"
    assert len(client.search_model_versions("name = 'digit-recognizer'")) == 1
    experiment = client.get_experiment_by_name("digit-recognizer").experiment_id
    (dead,) = client.search_runs([experiment], "tags.`digitlab.kind` = 'refit'")
    assert dead.info.status == "RUNNING"  # killed: nothing could end it

    done = subprocess.run([*run, "promote", "--refit", "--force", "--data-dir", str(tiny_dir)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "is now production (previous: version 1)" in done.stdout
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    finished = client.search_runs([experiment], "tags.`digitlab.kind` = 'refit' and attributes.status = 'FINISHED'")
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["members"] == finished[0].info.run_id
