"""The registered model: raw Kaggle rows in, label and class probabilities out.

This file is logged as MLflow "model code" (no pickle): MLflow copies it into
the model and runs it wherever the model is loaded (`digitlab submit`,
`mlflow models serve`, a notebook). It depends only on keras, numpy and
pandas, and holds the rescaling and reshaping, so every consumer gets the same
answer from the same 784 integer columns `pixel0..pixel783`.

One or more Keras models (native `.keras` files, artifacts `member_0`, ...) are
averaged, with the model config's `weights` if it has them; with `tta` the probabilities
are also averaged over one-pixel shifts.
"""

from __future__ import annotations

import contextlib
import os
import sys

import mlflow
import numpy as np
import pandas as pd

N_PIXELS = 784
PIXEL_COLUMNS = [f"pixel{i}" for i in range(N_PIXELS)]
OUTPUT_COLUMNS = ["label", *[f"prob_{k}" for k in range(10)]]
TTA_SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]


def to_images(rows) -> np.ndarray:
    """(n, 784) integers 0-255, as a DataFrame or array -> float32 (n, 28, 28, 1) in [0, 1]."""
    if isinstance(rows, pd.DataFrame):
        missing = [c for c in PIXEL_COLUMNS if c not in rows.columns]
        if missing:
            raise ValueError(f"input lacks column {missing[0]!r} (expected pixel0..pixel783)")
        rows = rows[PIXEL_COLUMNS]
    pixels = np.asarray(rows, dtype=np.float32)
    if pixels.ndim != 2 or pixels.shape[1] != N_PIXELS:
        raise ValueError(f"expected rows of {N_PIXELS} pixels, got shape {pixels.shape}")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError("pixel values must be in 0-255")
    return pixels.reshape(-1, 28, 28, 1) / np.float32(255.0)


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images moved by whole pixels, zero-filled at the border."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = images[:, ys, xs]
    return out


@contextlib.contextmanager
def _quiet_backend():
    """Standard error to /dev/null while the backend starts, unless DIGITLAB_VERBOSE is set (as `-v` sets it).

    TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are written before its logging
    is set up and ignore TF_CPP_MIN_LOG_LEVEL, and `mlflow models serve` has no --verbose.
    The digitlab command does the same in console.import_backend; this file is copied into
    every model and runs where digitlab may not be installed, so it cannot import that.
    """
    if os.environ.get("DIGITLAB_VERBOSE", "") not in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def __init__(self, models: list | None = None, tta: bool = False,
                 weights: list[float] | None = None):
        """Given models (scoring an ensemble in process), or none: `load_context` loads the
        logged ones. `weights`: one per model; None: equal."""
        self.models, self.tta, self.weights = models or [], tta, weights

    def load_context(self, context):
        members = sorted((k for k in context.artifacts if k.startswith("member_")),
                         key=lambda k: int(k.removeprefix("member_")))
        with _quiet_backend():
            import keras

            self.models = [keras.saving.load_model(context.artifacts[k], compile=False)
                           for k in members]
        model_config = context.model_config or {}
        self.tta = bool(model_config.get("tta", False))
        # one per member_i (an ensemble chosen by greedy selection); absent: equal
        self.weights = model_config.get("weights")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        shifts = TTA_SHIFTS if self.tta else [(0, 0)]
        weights = self.weights or [1.0] * len(self.models)
        total = np.zeros((len(images), 10), dtype=np.float64)
        for model, weight in zip(self.models, weights, strict=True):
            for dy, dx in shifts:
                batch = images if (dy, dx) == (0, 0) else shifted(images, dy, dx)
                total += weight * np.asarray(model.predict(batch, batch_size=1024, verbose=0),
                                             dtype=np.float64)
        return (total / (sum(weights) * len(shifts))).astype(np.float32)

    # The input is validated here (columns, shape, range). A DataFrame type hint is one that
    # MLflow takes without inferring a schema from it: it converts nothing and validates
    # nothing, and it does not warn that the hint is missing.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        probabilities = self.probabilities(to_images(model_input))
        frame = pd.DataFrame(probabilities, columns=OUTPUT_COLUMNS[1:])
        frame.insert(0, "label", probabilities.argmax(axis=1).astype(np.int64))
        return frame


mlflow.models.set_model(DigitClassifier())
