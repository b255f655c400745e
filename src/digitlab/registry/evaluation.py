"""Evaluation of a serving model on held-out images, by the path `digitlab submit` and
`mlflow models serve` use: Kaggle rows in, labels out; and the load check a registered
version passes before any alias moves."""

from __future__ import annotations

from collections.abc import Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import data as data_mod
from digitlab.errors import UserError, one_line


def to_rows(images: np.ndarray) -> pd.DataFrame:
    """Model-input images back to Kaggle rows (integers 0-255, pixel0..pixel783)."""
    pixels = np.rint(images.reshape(len(images), -1) * 255).astype(np.int64)
    return pd.DataFrame(pixels, columns=data_mod.PIXEL_COLUMNS)


def predict_labels(model, rows: pd.DataFrame, batch_size: int,
                   progress: Callable[[range], range] = lambda batches: batches) -> np.ndarray:
    """Labels of `rows` from a pyfunc model, `batch_size` rows at a time (`progress` may wrap
    the batches in a progress bar)."""
    labels = [np.asarray(model.predict(rows.iloc[i : i + batch_size])["label"])
              for i in progress(range(0, len(rows), batch_size))]
    return np.concatenate(labels).astype(np.int64) if labels else np.empty(0, dtype=np.int64)


def source_val_accuracy(members: list[Run]) -> float:
    """A refit validates on nothing: the validation accuracy its source trials' own models
    scored (their mean, for an ensemble) stands in for it."""
    client = MlflowClient()
    values = [client.get_run(m.data.tags["refit_of"]).data.metrics.get("val_accuracy_final_model")
              for m in members]
    return float(np.mean(values)) if None not in values else float("nan")


def evaluate(model, members: list[Run], scheme, group_sizes: list[int], dataset: data_mod.DigitData,
             batch_size: int, tta: bool, weights: list[float] | None = None) -> dict:
    """Validation accuracy on the members' own split, holdout accuracy when labels exist.

    K-fold members are scored out of fold: each training image by the fold models that held
    it out (`validation.fitter.held_out_accuracy`), not by all of them, most of which
    trained on it.
    Refits trained on every labelled image, so none is left to validate on: their source
    trials' validation accuracy is recorded instead (`source_val_accuracy`). `scheme`: how the
    members were validated (`validation.from_runs`); `group_sizes`: how many of the serving
    model's models each member brought (K for a K-fold trial).
    """
    if not scheme.holds_out:  # refits and final models: nothing left to validate on
        metrics = {"source_val_accuracy": source_val_accuracy(members)}
    else:
        # by the serving code, on the images the members held out, as their runs recorded
        # them (`scheme`); the Keras models are the ones the serving model loaded, member by member
        served = iter(model.unwrap_python_model().models)
        models = [[next(served) for _ in range(n)] for n in group_sizes]
        metrics = {"val_accuracy": scheme.score(models, dataset, tta, weights)}
    if dataset.test_labels is not None:
        metrics["holdout_accuracy"] = float(np.mean(
            predict_labels(model, to_rows(dataset.test_images), batch_size) == dataset.test_labels))
    return metrics


def load_check(name: str, version: str, dataset: data_mod.DigitData, rows: int) -> None:
    """The registered version must load and predict valid labels before any alias moves."""
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        out = model.predict(to_rows(dataset.test_images[:rows]))
        labels = np.asarray(out["label"])
        if len(labels) != rows or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"predicted {labels!r}")
    except Exception as exc:
        MlflowClient().set_model_version_tag(name, version, "load_check", "failed")
        raise UserError(f"version {version} failed its load check ({type(exc).__name__}: "
                        f"{one_line(exc)}); aliases unchanged") from None
    MlflowClient().set_model_version_tag(name, version, "load_check", "passed")
