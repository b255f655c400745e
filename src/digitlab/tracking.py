"""Everything MLflow: where runs go, how they end, and what each one records.

Pure logging: this module trains nothing and imports no backend; `training_run.tracked_run`
joins it to training."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from digitlab import plots
from digitlab.config import ExperimentConfig
from digitlab.data import DigitData
from digitlab.errors import Terminated

if TYPE_CHECKING:
    from digitlab.train import Result

MODEL_NAME = "model"


class RunHandle:
    """The run being recorded; set `status` to end it other than FINISHED (e.g. a pruned trial)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.status = "FINISHED"


def system_metrics_enabled() -> bool:
    """CPU, memory (and GPU, with nvidia-ml-py) sampled into every training run; off with
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")


@contextlib.contextmanager
def open_run(name: str | None = None, nested: bool = False, tags: dict | None = None,
             parent_run_id: str | None = None, experiment_id: str | None = None,
             system_metrics: bool | None = None):
    """A run that always ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C/SIGTERM."""
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, _raise_terminated)
    tags = {k: str(v) for k, v in (tags or {}).items()}  # a tracking server takes strings only
    if parent_run_id and (launched := os.environ.get("MLFLOW_RUN_ID")):
        # `mlflow run`'s run is resumed, not created, and start_run ignores parent_run_id
        # then: nest it by the tag that parent_run_id would have set (same experiment only).
        client = mlflow.MlflowClient()
        if client.get_run(launched).info.experiment_id == client.get_run(parent_run_id).info.experiment_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        parent_run_id = None
    active = mlflow.start_run(run_name=name, nested=nested, tags=tags, parent_run_id=parent_run_id,
                              experiment_id=experiment_id, log_system_metrics=system_metrics)
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


def epoch_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """The per-epoch sink for `train.run`: metrics to `run_id`, step = epoch (from 1)."""

    def log(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch, run_id=run_id)

    return log


def log_setup(config: ExperimentConfig, data: DigitData, validation) -> None:
    """What is known before training: config, data, environment, and how it is validated
    (`digitlab.validation`). A failed run keeps it."""
    params = {key: str(value) for key, value in config.flat().items() if key != "description"}
    params.update({"data.source": data.source, "data.digest": data.digest,
                   "data.train_rows": len(data.train_labels), "data.test_rows": len(data.test_images)})
    mlflow.log_params(params)
    mlflow.set_tags(
        {
            "experiment": config.name,
            "seed": config.seed,
            "backend": backend(),
            "device": device(),
            "data_digest": data.digest,
            **({"git_commit": commit} if (commit := git_commit()) else {}),
            **{f"version.{p}": v for p, v in package_versions().items()},
        }
    )
    # What this run trains, from its own values (a trial's sampled ones included); the
    # experiment file's prose would describe the file's defaults instead.
    mlflow.set_tag("mlflow.note.content", config.summary())
    # The validation split (or the folds), as tags a promotion reads back to evaluate on
    # the same images (`validation.from_run`).
    mlflow.set_tags(validation.tags(config))
    mlflow.log_text(config.to_yaml(), "config.yaml")
    log_datasets(config, data, validation)


def log_datasets(config: ExperimentConfig, data: DigitData, validation) -> None:
    """The training, validation and holdout (or unlabelled test) images as MLflow datasets,
    with their real shapes, the data directory as source, and digests that name the split
    (with K folds, one `training` dataset of every labelled image; a refit has no
    validation images)."""
    import hashlib

    parts, split_key = validation.datasets(config, data)
    test = "holdout" if data.test_labels is not None else "test"
    parts[test] = (data.test_images, data.test_labels)
    source = str(Path(data.source).resolve())
    for context, (images, labels) in parts.items():
        key = f"{data.digest}|{context}|{split_key}"
        dataset = mlflow.data.from_numpy(
            images, targets=labels, source=source, name=f"digit-recognizer-{context}",
            digest=hashlib.sha256(key.encode()).hexdigest()[:32])
        try:
            mlflow.log_input(dataset, context=context)
        except mlflow.exceptions.MlflowException:
            # The store looks the dataset up and inserts it if missing in one transaction,
            # so workers starting together can both insert it; the loser's transaction
            # fails on the unique key and rolls back. Once more finds the row; any other
            # error raises again.
            mlflow.log_input(dataset, context=context)


def log_result(result: Result) -> None:
    """Metrics, figures, tables and held-out predictions, once training has ended (the
    models: the run's validation logs them)."""
    metrics = {
        "best_val_accuracy": result.best_val_accuracy,
        "val_accuracy_final_model": result.val_accuracy,
        "val_crossentropy_final_model": result.val_crossentropy,
        "best_epoch": result.best_epoch + 1,
        "epochs_trained": result.epochs_trained,
        # The fidelity the run reached: images fed, and how many distinct ones they came from
        "images_seen": result.images_seen,
        "subset_size": result.subset_size,
        "train_seconds": result.train_seconds,
        "parameters": result.model.count_params(),
    }
    if result.holdout_accuracy is not None:
        metrics["holdout_accuracy"] = result.holdout_accuracy
    if result.best_epoch < 0:  # no validation images (a refit): no best epoch either
        del metrics["best_epoch"]
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    mlflow.set_tag("precision", result.precision)

    for path, figure in plots.figures(result).items():
        log_figure(figure, path)
    counts = plots.confusion_counts(result.split.val_labels, result.val_probabilities.argmax(1))
    if len(result.split.val_labels):
            mlflow.log_text(pd.DataFrame(counts, index=pd.Index(range(10), name="true"),
                                     columns=[f"pred_{i}" for i in range(10)]).to_csv(),
                        "confusion_matrix.csv")
    log_predictions(result)


# Every run's class probabilities on its held-out images, with their rows in train.csv:
# what `promote --ensemble auto` chooses an ensemble from, without predicting again.
PREDICTIONS_ARTIFACT = "validation_predictions.npz"


def log_predictions(result: Result) -> None:
    split = result.split
    if not len(split.val_labels) or split.val_rows is None:  # a refit holds nothing out
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS_ARTIFACT
        # float16: 20 bytes an image (class probabilities to 3 significant digits)
        np.savez_compressed(path, rows=split.val_rows.astype(np.int32),
                            labels=split.val_labels.astype(np.int8),
                            probabilities=result.val_probabilities.astype(np.float16))
        mlflow.log_artifact(str(path))


def log_model(result: Result) -> None:
    from mlflow.models import infer_signature

    split = result.split
    if len(split.val_labels):
        signature = infer_signature(split.val_images[:2], result.val_probabilities[:2])
    else:  # a refit has no validation images: two training images show the shapes
        signature = infer_signature(split.train_images[:2],
                                    result.model.predict(split.train_images[:2], verbose=0))
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
    names = ["keras", backend(), "mlflow",
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


def backend() -> str:
    """The Keras backend, read where it is set (importing Keras here would load TensorFlow
    for every command that only reads the store)."""
    import keras

    return keras.backend.backend()


def device() -> str:
    from digitlab import runtime

    return runtime.device_name()
