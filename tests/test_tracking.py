"""Training runs end to end through the CLI, checked in a real SQLite MLflow store."""

import json
import os
import signal
import subprocess
import sys
import threading

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, store


def only_run(experiment="digit-recognizer"):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return runs


def test_train_logs_a_complete_run(workdir, tiny_dir, capsys):
    code = cli.main(["train", "--experiment", "basic_cnn", "--epochs", "2", "--data-dir", str(tiny_dir),
                     "--set", "model.dropout=0.3"])
    assert code == 0
    out = capsys.readouterr().out
    runs = only_run()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out

    params = run.data.params
    assert params["model.dropout"] == "0.3"
    assert params["training.epochs"] == "2"
    assert params["training.batch_size"] == "64"
    assert len(params["data.digest"]) == 64

    client = MlflowClient()
    for key in ("loss", "accuracy", "crossentropy", "val_loss", "val_accuracy", "val_crossentropy",
                "learning_rate"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(max(val))
    # the kept model is the last epoch's here, so its cross-entropy is that epoch's
    last = client.get_metric_history(run.info.run_id, "val_crossentropy")[-1].value
    assert run.data.metrics["val_crossentropy_final_model"] == pytest.approx(last, rel=1e-3)
    assert 0 <= run.data.metrics["holdout_accuracy"] <= 1

    tags = run.data.tags
    assert tags["experiment"] == "basic_cnn"
    assert tags["seed"] == "42"
    assert tags["backend"] == "tensorflow"
    assert tags["device"] == "CPU"
    assert tags["data_digest"] == params["data.digest"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    for expected in ("config.yaml", "confusion_matrix.csv", "plots/training_curves.png",
                     "plots/confusion_matrix.png", "plots/sample_predictions.png",
                     "plots/misclassified.png"):
        assert expected in artifacts, expected

    # the logged config reproduces the run's config
    config_text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "dropout: 0.3" in config_text

    # training, validation and holdout images are MLflow inputs with their real shapes
    # and the data directory as source
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "holdout"}
    shapes = {context: json.loads(d.profile)["features_shape"] for context, d in inputs.items()}
    assert shapes == {"training": [270, 28, 28, 1], "validation": [30, 28, 28, 1],
                      "holdout": [50, 28, 28, 1]}
    assert all(str(tiny_dir) in d.source for d in inputs.values())
    assert len({d.digest for d in inputs.values()}) == 3
    assert tags["split_seed"] == "42" and tags["validation_fraction"] == "0.1"
    assert "conv 32-64" in tags["mlflow.note.content"]  # describes what it trained

    # the model is logged in the native Keras format and predicts
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'",
                                         output_format="list")
    assert len(models) == 1
    model = mlflow.keras.load_model(models[0].model_uri)
    probabilities = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    assert probabilities.shape == (2, 10)
    local = mlflow.artifacts.download_artifacts(models[0].model_uri)
    assert any(name.endswith(".keras") for _, _, files in os.walk(local) for name in files)
    assert "signature" in open(os.path.join(local, "MLmodel")).read()


def test_same_seed_same_validation_metrics(workdir, tiny_dir):
    args = ["train", "--experiment", "basic_cnn", "--epochs", "2", "--data-dir", str(tiny_dir)]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    client = MlflowClient()
    first, second = only_run()
    for key in ("val_accuracy", "val_loss"):
        a = [m.value for m in client.get_metric_history(first.info.run_id, key)]
        b = [m.value for m in client.get_metric_history(second.info.run_id, key)]
        assert a == b, key


class Boom(Exception):
    pass


def test_a_run_that_raises_ends_failed_with_what_it_logged(workdir, tiny_dir, monkeypatch):
    import keras

    class Explode(keras.callbacks.Callback):  # injected fault: training dies after epoch 1
        def on_epoch_end(self, epoch, logs=None):
            if self.params.get("epochs") == 4:  # the tracked run, not the length line's timing
                raise Boom("injected")

    from digitlab import train

    real = train.recipe_callbacks
    monkeypatch.setattr(train, "recipe_callbacks", lambda cfg: [*real(cfg), Explode()])
    with pytest.raises(Boom):
        cli.main(["train", "--experiment", "dnn", "--epochs", "4", "--data-dir", str(tiny_dir)])
    (run,) = only_run()
    assert run.info.status == "FAILED"
    assert run.data.params["model.dropout"] == "0.2"
    history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]


def test_a_dataset_another_worker_logged_first_is_logged_again(workdir, tiny_dir, monkeypatch):
    # Injected fault: as when two search workers start together, another run creates the
    # dataset between this run's lookup and its insert, and the insert fails on the unique key.
    real = mlflow.log_input

    def raced(dataset, **kwargs):
        monkeypatch.setattr(mlflow, "log_input", real)
        with mlflow.start_run(nested=True, run_name="other worker"):
            real(dataset, **kwargs)
        raise mlflow.exceptions.MlflowException(
            "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
            "datasets.name, datasets.digest")

    monkeypatch.setattr(mlflow, "log_input", raced)
    args = ["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(tiny_dir)]
    assert cli.main(args) == 0
    client = MlflowClient()
    (run,) = [r for r in only_run() if r.info.run_name != "other worker"]
    assert run.info.status == "FINISHED"
    logged = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert {i.tags[0].value for i in logged} == {"training", "validation", "holdout"}


def test_sigterm_ends_the_run_killed(workdir, tiny_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "digitlab", "train", "--experiment", "dnn", "--epochs", "500",
         "--data-dir", str(tiny_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    watchdog = threading.Timer(180, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:  # one line per epoch once training has started
            seen.append(line)
            if "val_accuracy" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out = "".join(seen) + proc.communicate(timeout=60)[0]
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 143, out[-2000:]
    (run,) = only_run()
    assert run.info.status == "KILLED"
    assert MlflowClient().get_metric_history(run.info.run_id, "loss")


def test_compare_logs_children_and_a_chart(workdir, tiny_dir, capsys):
    code = cli.main(["compare", "--experiments", "dnn,lenet5", "--epochs", "1",
                     "--data-dir", str(tiny_dir)])
    assert code == 0
    runs = only_run()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["experiment"] for c in children} == {"dnn", "lenet5"}
    client = MlflowClient()
    paths = {a.path for a in client.list_artifacts(parent.info.run_id)}
    paths |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"comparison.csv", "plots/comparison.png"} <= paths
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/comparison.csv")
    header = table.splitlines()[0].split(",")
    assert {"experiment", "best_val_accuracy", "holdout_accuracy", "parameters", "train_seconds"} <= set(header)
    assert len(table.splitlines()) == 3
    assert parent.data.tags["best_experiment"] in {"dnn", "lenet5"}


def test_malformed_data_leaves_no_run_in_an_existing_store(workdir, tiny_dir, tmp_path):
    assert cli.main(["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(tiny_dir)]) == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text((tiny_dir / "train.csv").read_text().replace(",0,", ",x,", 1))
    (bad / "test.csv").write_text((tiny_dir / "test.csv").read_text())
    assert cli.main(["train", "--experiment", "dnn", "--data-dir", str(bad)]) == 2
    assert len(only_run()) == 1


def test_runs_go_to_the_experiment_named_by_mlflow_experiment_id(workdir, tiny_dir, monkeypatch):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    chosen = MlflowClient().create_experiment("mine")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    assert cli.main(["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(tiny_dir)]) == 0
    assert len(only_run("mine")) == 1
    assert mlflow.get_experiment_by_name("digit-recognizer") is None
    assert store.experiment_id() == chosen


def test_an_unknown_mlflow_experiment_id_is_a_one_line_error(workdir, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "12345")
    assert cli.main(["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(tiny_dir)]) == 2
    # (MLflow logs the creation of the new store on stderr before our one line)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("digitlab:")]
    assert errors == ["digitlab: error: MLFLOW_EXPERIMENT_ID=12345: No Experiment with id=12345 exists"]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_configure_leaves_no_experiment_id_for_the_next_store(workdir, tmp_path, monkeypatch):
    """MLflow's set_experiment exports the id; left there, a second configure in the same
    process, for another store, would take it for the user's choice."""
    store.configure()
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert store.experiment_id() == mlflow.get_experiment_by_name("digit-recognizer").experiment_id
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'mlflow.db'}")
    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).create_experiment("first-here")  # takes id 1
    store.configure()
    assert mlflow.get_experiment(store.experiment_id()).name == "digit-recognizer"


def test_an_experiment_kind_tag_another_worker_set_first_is_not_an_error(workdir, monkeypatch):
    # Injected fault: workers starting together both see the new experiment untagged; the
    # other one's tag lands first and this one's insert fails on the primary key.
    real = MlflowClient.set_experiment_tag

    def raced(self, experiment_id, key, value):
        real(self, experiment_id, key, value)
        raise mlflow.exceptions.MlflowException(
            'duplicate key value violates unique constraint "experiment_tag_pk"')

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", raced)
    store.configure()
    tags = MlflowClient().get_experiment(store.experiment_id()).tags
    assert tags[store.EXPERIMENT_KIND_TAG] == store.MODEL_TRAINING_KIND


def test_an_experiment_kind_tag_that_cannot_be_set_is_an_error(workdir, monkeypatch):
    def refused(self, experiment_id, key, value):
        raise mlflow.exceptions.MlflowException("PERMISSION_DENIED")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refused)
    with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED"):
        store.configure()
