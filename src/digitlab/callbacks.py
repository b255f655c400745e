"""The Keras callbacks of the one training path: the per-epoch record (and its sinks:
MLflow, the progress line), the recipe's learning-rate schedule, early stopping, best or
averaged weights, and a search trial's pruning hook."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

import keras
import numpy as np

from digitlab.config import ExperimentConfig
from digitlab.metrics import EPOCH_METRICS


class EpochRecorder(keras.callbacks.Callback):
    """The one per-epoch callback: adds the epoch's learning rate to the logs, keeps every
    epoch's values, and hands the finite ones to `on_epoch(epoch, metrics)` (epoch counted
    from 1, as Keras prints it), which is how MLflow receives them.

    It runs first, so later callbacks (pruning) see `learning_rate` and `images_seen` too,
    and it reads the rate before plateau reduction changes it for the next epoch. It also
    times each epoch (validation included): what a search's budget plan extrapolates from.
    """

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                 images_per_epoch: int = 0) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.diverged = False
        self.on_epoch = on_epoch
        self.images_per_epoch = images_per_epoch
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.images_per_epoch:
            logs["images_seen"] = float((epoch + 1) * self.images_per_epoch)
        values = {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        if self.on_epoch is not None:
            finite = {k: v for k, v in values.items() if math.isfinite(v)}
            if finite:
                self.on_epoch(epoch + 1, finite)
        if not math.isfinite(float(logs.get("loss", 0.0))):
            self.diverged = True
            self.model.stop_training = True


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best validation accuracy and restores them.

    The seed project checkpointed the best model to disk; holding the weights in
    memory gives the same model without file I/O every epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.best = -math.inf
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy", -math.inf)
        if value > self.best:
            self.best, self.weights = value, self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


class WeightAverage(keras.callbacks.Callback):
    """Ends training on the mean of the weights at the end of the last `epochs` epochs.

    Stochastic weight averaging, with the annealed rate's last epochs as its samples:
    each epoch's weights sit at a different point near the same minimum, and their mean
    smooths out the epoch-to-epoch noise of any one of them, at no training cost. It runs
    after early stopping, whose restored weights it replaces; with early stopping the
    epochs are the last ones before the stop.
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.snapshots: collections.deque[list[np.ndarray]] = collections.deque(maxlen=epochs)

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append(self.model.get_weights())

    def on_train_end(self, logs=None):
        if len(self.snapshots) < 2:
            return
        averaged = []
        for values in zip(*self.snapshots, strict=True):
            last = values[-1]
            # counters and other integer state keep their last value
            averaged.append(np.mean(values, axis=0).astype(last.dtype)
                            if np.issubdtype(last.dtype, np.floating) else last)
        self.model.set_weights(averaged)


def recipe_callbacks(config: ExperimentConfig) -> list[keras.callbacks.Callback]:
    t = config.training
    callbacks: list[keras.callbacks.Callback] = []
    if t.lr_decay < 1.0:
        base, decay = config.optimizer.learning_rate, t.lr_decay
        # Multiply the current rate rather than recompute base * decay**epoch, so the
        # cuts ReduceLROnPlateau makes at an epoch's end carry into the next epoch.
        callbacks.append(
            keras.callbacks.LearningRateScheduler(
                lambda epoch, lr: base if epoch == 0 else float(lr) * decay
            )
        )
    if t.reduce_lr.enabled:
        r = t.reduce_lr
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=r.monitor, factor=r.factor, patience=r.patience, min_lr=r.min_lr
            )
        )
    if t.early_stopping.enabled:
        e = t.early_stopping
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=e.monitor, patience=e.patience, restore_best_weights=not t.restore_best
            )
        )
    if t.restore_best:
        callbacks.append(BestWeights())
    if t.average_last_epochs > 1:  # last: its weights are the ones training ends on
        callbacks.append(WeightAverage(t.average_last_epochs))
    return callbacks


class PruningHook(keras.callbacks.Callback):
    """Reports the objective after every epoch; stops training when the engine says prune."""

    def __init__(self, metric: str, report: Callable[[int, float], bool]) -> None:
        super().__init__()
        self.metric = metric
        self.report = report
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        if self.report(epoch + 1, float(value)):
            self.pruned_at = epoch + 1
            self.model.stop_training = True
