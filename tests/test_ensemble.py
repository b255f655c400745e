"""`promote --ensemble auto`: greedy selection (Caruana et al. 2004) over the held-out
predictions every trial stores, through promote, submit and serving."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from digitlab import cli
from digitlab.search import ensemble
from digitlab.tracking import PREDICTIONS_ARTIFACT
from tests.conftest import TINY_SPACE


def test_greedy_picks_two_complementary_models_over_the_two_best_single_ones():
    """A is sure and right on the first half of the images and unsure on the second; B
    the other way round, and weaker. C and D are unsure everywhere. The two best single
    models are A and C, which the top 2 would average; A and B together beat that."""
    n = 200
    labels = np.zeros(n, dtype=np.int64)
    first = np.arange(n) < n // 2

    def model(p_first, p_second):
        right = np.where(first, p_first, p_second)
        return np.column_stack([right, *[(1 - right) / 9] * 9])

    a, b, c, d = model(0.99, 0.30), model(0.20, 0.99), model(0.52, 0.52), model(0.50, 0.50)
    singles = [ensemble.log_loss(p, labels) for p in (a, b, c, d)]
    assert np.argsort(singles)[:2].tolist() == [0, 2]  # A, then C
    counts = ensemble.greedy([a, c, d, b], labels, max_size=10)  # in rank order
    assert counts[0] > 0 and counts[3] > 0 and counts[1] == counts[2] == 0, counts
    mixed = (counts[0] * a + counts[3] * b) / (counts[0] + counts[3])
    assert ensemble.log_loss(mixed, labels) < ensemble.log_loss((a + c) / 2, labels) < min(singles)


def test_greedy_stops_at_the_best_single_model_when_nothing_helps():
    labels = np.array([0, 1, 2])
    perfect = np.eye(10)[labels] * 0.999 + 0.0001
    worse = np.full((3, 10), 0.1)
    assert ensemble.greedy([perfect, worse], labels, max_size=5) == [1, 0]
    assert sum(ensemble.greedy([worse, worse], labels, max_size=3)) == 1  # no gain from repeats


def test_equal_weights_are_the_plain_average_and_the_same_version():
    """`auto` picking one trial alone (weight 1), or several evenly, is the model that
    `--run` registers: the same source key, so promote finds that version again."""
    from types import SimpleNamespace

    from digitlab.registry import packaging

    runs = [SimpleNamespace(info=SimpleNamespace(run_id=r)) for r in ("a", "b")]
    assert packaging.source_key(runs[:1], False, [1.0]) == packaging.source_key(runs[:1], False)
    assert packaging.source_key(runs, True, [0.5, 0.5]) == packaging.source_key(runs, True)
    assert packaging.source_key(runs, True, [0.75, 0.25]) != packaging.source_key(runs, True)
    assert packaging.unequal([0.75, 0.25]) == [0.75, 0.25] and packaging.unequal([1.0]) is None


def test_ensemble_auto_through_promote_submit_and_serving(workdir, tiny_dir, capsys):
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 4"))
    data = ["--data-dir", str(tiny_dir)]
    assert cli.main(["search", "--space", "space.yaml", *data]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    trials = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                filter_string="tags.trial_state = 'COMPLETE'")
    assert len(trials) == 4
    # every completed trial stored its held-out predictions, rows of the study's split
    stored = [ensemble.stored_predictions(t) for t in trials]
    rows = stored[0]["rows"]
    assert len(rows) == 30 and all(np.array_equal(s["rows"], rows) for s in stored)
    assert stored[0]["probabilities"].shape == (30, 10)
    np.testing.assert_allclose(stored[0]["probabilities"].astype(np.float32).sum(1), 1.0, atol=1e-2)
    labels = pd.read_csv(tiny_dir / "train.csv")["label"].to_numpy()
    assert np.array_equal(stored[0]["labels"], labels[rows])

    capsys.readouterr()
    assert cli.main(["promote", "--ensemble", "auto", *data]) == 0
    out, err = capsys.readouterr()
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["ensemble"] == "auto"
    picks = dict(p.split(":") for p in version.tags["ensemble_weights"].split(","))
    assert abs(sum(float(w) for w in picks.values()) - 1) < 1e-3
    members = version.tags["members"].split(",")
    assert len(members) == len(picks) >= 1
    assert "greedy selection" in version.description and "held-out images" in version.description
    assert "registered digit-recognizer version 1" in out

    # submit and serving use the weighted ensemble the registry holds
    assert cli.main(["submit", *data]) == 0
    model = mlflow.pyfunc.load_model("models:/digit-recognizer@production")
    rows = pd.read_csv(tiny_dir / "test.csv").head(5)
    predicted = model.predict(rows)
    assert list(predicted.columns[:2]) == ["label", "prob_0"]
    submitted = pd.read_csv(workdir / "submissions" / "submission.csv")["Label"].head(5).tolist()
    assert predicted["label"].tolist() == submitted


def test_a_trial_without_stored_predictions_is_left_out_with_one_line(workdir, tiny_dir, capsys):
    (workdir / "space.yaml").write_text(TINY_SPACE)
    data = ["--data-dir", str(tiny_dir)]
    assert cli.main(["search", "--space", "space.yaml", *data]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    trials = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                filter_string="tags.trial_state = 'COMPLETE'")
    older = trials[0]
    # as a trial logged by an older digitlab: its run has no predictions artifact
    os.remove(os.path.join(older.info.artifact_uri.removeprefix("file://"), PREDICTIONS_ARTIFACT))
    capsys.readouterr()
    assert cli.main(["promote", "--ensemble", "auto", *data]) == 0
    captured = capsys.readouterr()
    err = captured.err + captured.out
    lines = [line for line in err.splitlines() if "stored no held-out predictions" in line]
    assert lines == ["--ensemble auto: 1 of 3 completed trials stored no held-out predictions "
                     "(logged by an older digitlab) and are left out"], err
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    assert older.info.run_id not in version.tags["members"]


def test_auto_with_no_stored_predictions_at_all_is_one_line_exit_2(workdir, tiny_dir, capsys):
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 1"))
    data = ["--data-dir", str(tiny_dir)]
    assert cli.main(["search", "--space", "space.yaml", *data]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (trial,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                  filter_string="tags.trial_state = 'COMPLETE'")
    os.remove(os.path.join(trial.info.artifact_uri.removeprefix("file://"), PREDICTIONS_ARTIFACT))
    capsys.readouterr()
    assert cli.main(["promote", "--ensemble", "auto", *data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("digitlab: error: --ensemble auto: none of the 1 completed trials")
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_registered_model("digit-recognizer")
