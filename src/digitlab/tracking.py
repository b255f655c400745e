"""Everything MLflow: where runs go, how they end, and what each one records."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import signal
import subprocess
import threading

import keras
import mlflow
import numpy as np
import pandas as pd

from digitlab import plots, runtime, train
from digitlab.config import ExperimentConfig
from digitlab.data import DigitData
from digitlab.errors import Terminated, UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "digit-recognizer"
MODEL_NAME = "model"


def configure() -> str:
    """Point MLflow at the store and experiment; returns the tracking URI.

    Artifacts go where MLflow puts them for the store: with the SQLite default,
    files under ./mlruns/ beside mlflow.db, the same whether `digitlab` or
    `mlflow run` created the experiment.

    Under `mlflow run` (MLFLOW_RUN_ID set) the run and its experiment are already
    chosen, and we log into them. Otherwise MLflow's own order: the experiment named
    in MLFLOW_EXPERIMENT_NAME, else the one whose id is in MLFLOW_EXPERIMENT_ID, else
    `digit-recognizer`.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if os.environ.get("MLFLOW_RUN_ID"):
        mark_model_training(experiment_id())
        return uri
    if chosen_id := _chosen_experiment_id():
        try:
            mlflow.set_experiment(experiment_id=chosen_id)
        except mlflow.exceptions.MlflowException as exc:  # unknown, malformed or deleted
            raise UserError(f"MLFLOW_EXPERIMENT_ID={chosen_id}: {exc.message}") from None
        mark_model_training(chosen_id)
        return uri
    name = experiment_name()
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    try:
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException:
        mlflow.set_experiment(name)  # a parallel process created it first
    # set_experiment also exports the id in MLFLOW_EXPERIMENT_ID; put back what was there,
    # or a later `configure` in this process (for another store, say) or a subprocess would
    # take the id for the user's choice.
    if before is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before
    mark_model_training(experiment_id())
    return uri


# The MLflow 3 UI opens an experiment as a GenAI one (traces, evaluation runs) unless its
# kind tag says model training; then it lands on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training(experiment: str | None) -> None:
    if not experiment:
        return
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment).tags:
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def ui_url(host: str, port: int, experiment: str) -> str:
    """The experiment's training-runs page; `workflowType` overrides a browser that last
    showed the GenAI view (the UI keeps that choice in its local storage)."""
    return f"http://{host}:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def _chosen_experiment_id() -> str | None:
    """The id in MLFLOW_EXPERIMENT_ID, unless MLFLOW_EXPERIMENT_NAME (which wins) is set."""
    return None if os.environ.get("MLFLOW_EXPERIMENT_NAME") else os.environ.get("MLFLOW_EXPERIMENT_ID")


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_id() -> str | None:
    """The experiment this command works in, None when it does not exist yet: `mlflow run`'s,
    else chosen in the order that `configure` follows."""
    if os.environ.get("MLFLOW_RUN_ID") and (launched := os.environ.get("MLFLOW_EXPERIMENT_ID")):
        return launched
    if chosen_id := _chosen_experiment_id():
        return chosen_id
    experiment = mlflow.get_experiment_by_name(experiment_name())
    return experiment.experiment_id if experiment else None


class RunHandle:
    """The run being recorded; set `status` to end it other than FINISHED (e.g. a pruned trial)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.status = "FINISHED"


def check_server(uri: str) -> None:
    """Fail fast, with a clear message, when the tracking server cannot be reached."""
    import requests

    # MLflow itself retries a dead server for minutes; after this check a few tries suffice.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the MLflow tracking server at {uri}: "
                        f"{type(exc).__name__}") from None


@contextlib.contextmanager
def run(name: str | None = None, nested: bool = False, tags: dict | None = None,
        parent_run_id: str | None = None, experiment_id: str | None = None):
    """A run that always ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C/SIGTERM."""
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, _raise_terminated)
    tags = {k: str(v) for k, v in (tags or {}).items()}  # a tracking server takes strings only
    active = mlflow.start_run(run_name=name, nested=nested, tags=tags, parent_run_id=parent_run_id,
                              experiment_id=experiment_id)
    handle = RunHandle(active.info.run_id)
    try:
        yield handle
    except (KeyboardInterrupt, Terminated):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run(handle.status)
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def _raise_terminated(signum, frame):
    raise Terminated()


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active run, step = epoch (1-based, as Keras prints it)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def on_epoch_end(self, epoch, logs=None):
        metrics = {
            key: float(logs[key])
            for key in train.EPOCH_METRICS
            if key in (logs or {}) and math.isfinite(float(logs[key]))
        }
        if metrics:
            mlflow.log_metrics(metrics, step=epoch + 1, run_id=self.run_id)


def log_setup(config: ExperimentConfig, data: DigitData) -> None:
    """What is known before training: config, data, environment. A failed run keeps it."""
    params = {key: str(value) for key, value in config.flat().items() if key != "description"}
    params.update({"data.source": data.source, "data.digest": data.digest,
                   "data.train_rows": len(data.train_labels), "data.test_rows": len(data.test_images)})
    mlflow.log_params(params)
    mlflow.set_tags(
        {
            "experiment": config.name,
            "seed": config.seed,
            "backend": runtime.backend(),
            "device": runtime.device_name(),
            "data_digest": data.digest,
            **({"git_commit": commit} if (commit := git_commit()) else {}),
            **{f"version.{p}": v for p, v in package_versions().items()},
        }
    )
    if config.description:
        mlflow.set_tag("mlflow.note.content", config.description)
    mlflow.log_text(config.to_yaml(), "config.yaml")
    dataset = mlflow.data.from_numpy(
        data.train_images[:1],  # schema only: the digest below identifies the content
        targets=data.train_labels[:1],
        name="digit-recognizer",
        digest=data.digest[:32],
    )
    try:
        mlflow.log_input(dataset, context="training")
    except mlflow.exceptions.MlflowException:
        # The store looks the dataset up and inserts it if missing in one transaction, so
        # workers starting together can both insert it; the loser's transaction fails on
        # the unique key and rolls back (seen: SQLite, `--workers 2`). Once more finds the
        # row; any other error raises again.
        mlflow.log_input(dataset, context="training")


def log_result(result: train.Result, with_model: bool = True) -> None:
    """Metrics, figures, tables and (unless told otherwise) the model, once training has ended."""
    split = result.split
    metrics = {
        "best_val_accuracy": result.best_val_accuracy,
        "val_accuracy_final_model": result.val_accuracy,
        "val_crossentropy_final_model": result.val_crossentropy,
        "best_epoch": result.best_epoch + 1,
        "epochs_trained": result.epochs_trained,
        "train_seconds": result.train_seconds,
        "parameters": result.model.count_params(),
    }
    if result.holdout_accuracy is not None:
        metrics["holdout_accuracy"] = result.holdout_accuracy
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    mlflow.set_tag("precision", result.precision)

    title = result.config.name
    predicted = result.val_probabilities.argmax(1)
    log_figure(plots.training_curves(result.history, title), "plots/training_curves.png")
    counts = plots.confusion_counts(split.val_labels, predicted)
    log_figure(plots.confusion_matrix(counts, f"{title}: validation confusion matrix"),
                "plots/confusion_matrix.png")
    mlflow.log_text(
        pd.DataFrame(counts, index=pd.Index(range(10), name="true"),
                     columns=[f"pred_{i}" for i in range(10)]).to_csv(),
        "confusion_matrix.csv",
    )
    show = slice(0, 32)
    log_figure(plots.image_grid(split.val_images[show], split.val_labels[show], predicted[show],
                                 f"{title}: sample validation predictions"),
                "plots/sample_predictions.png")
    wrong = np.flatnonzero(predicted != split.val_labels)[:32]
    log_figure(plots.image_grid(split.val_images[wrong], split.val_labels[wrong], predicted[wrong],
                                 f"{title}: misclassified validation images"),
                "plots/misclassified.png")
    if with_model:
        log_model(result)


def log_model(result: train.Result) -> None:
    from mlflow.models import infer_signature

    signature = infer_signature(result.split.val_images[:2], result.val_probabilities[:2])
    mlflow.keras.log_model(
        result.model,
        name=MODEL_NAME,
        signature=signature,
        # Pinned from this environment: inferring requirements costs a subprocess per model.
        pip_requirements=[f"{p}=={v}" for p, v in package_versions().items() if p != "mlflow"],
    )


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, path)
    plt.close(fig)


def package_versions() -> dict[str, str]:
    names = ["keras", runtime.backend() if runtime.backend() != "torch" else "torch", "mlflow",
             "numpy"]
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def train_tracked(config: ExperimentConfig, data: DigitData, nested: bool = False,
                  verbose: int | str = "auto") -> tuple[str, train.Result]:
    """One tracked training run: setup logged first, then `train.run`, then the results.

    A run that diverged or learnt nothing (`train.Result.failure`, the same judgement a
    search trial gets) keeps its curves but no model, is tagged `fail_reason` and `error`,
    and ends FAILED with `TrainingFailed`.
    """
    from digitlab.errors import TrainingFailed

    with run(config.name, nested=nested) as active:
        log_setup(config, data)
        logger = EpochLogger(active.run_id)
        result = train.run(config, data, callbacks=[logger], verbose=verbose)
        failure = result.failure
        log_result(result, with_model=failure is None)
        if failure is not None:
            mlflow.set_tags({"fail_reason": failure.reason, "error": failure.message[:5000]})
            raise TrainingFailed(f"{config.name}: {failure.message}; run {active.run_id} ended "
                                 "FAILED, without a model", failure.reason)
        return active.run_id, result
