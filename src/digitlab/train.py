"""The single training path: `run(config, data, callbacks, on_epoch) -> Result`.

Every tracked run (`training_run.tracked_run`: `digitlab train`, `compare`, every search
trial) trains through this function; a trial differs from a plain run only by its
config overrides and the pruning callback it passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import keras
import numpy as np

from digitlab import console, models, runtime, stream
from digitlab import data as data_mod
from digitlab.callbacks import EpochRecorder, recipe_callbacks
from digitlab.config import ExperimentConfig
from digitlab.data import DigitData, Split

DIVERGED = "diverged"
NO_BETTER_THAN_CHANCE = "no better than chance"
# The loss a run minimises falls, epoch by epoch, unless the optimiser is stepping past
# the minima; a last epoch ten times worse than the first is that, not noise.
LOSS_EXPLOSION_FACTOR = 10.0
# How far above always answering the most common digit a model must score. A model that
# has learnt digits at all is far above that after one epoch on MNIST-size data, and on a
# validation set of a few dozen images (one image is 3 points) this is about two standard
# errors of a guesser's score.
CHANCE_MARGIN = 0.1


class Failure(NamedTuple):
    """Why a finished training run is no usable result: `reason` is a short tag, `message`
    the sentence for people."""

    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Result:
    config: ExperimentConfig
    model: keras.Model  # the classifier alone, without the augmentation layers
    split: Split
    history: dict[str, list[float]]
    val_probabilities: np.ndarray
    holdout_probabilities: np.ndarray | None
    holdout_accuracy: float | None
    train_seconds: float
    precision: str
    diverged: bool = False  # the loss became NaN or infinite
    feed: stream.Feed | None = None  # epochs of a fixed number of images; None: passes
    epoch_seconds: tuple[float, ...] = ()  # wall time of each epoch, validation included
    parts: tuple = ()  # a run of several splits: each split's own result (validation.fitter)

    @property
    def images_seen(self) -> int:
        """Training images fed, counted again each time one comes back."""
        return stream.images_seen(self.feed, self.epochs_trained, len(self.split.train_labels))

    @property
    def subset_size(self) -> int:
        """How many distinct training images the run drew from by its last epoch: fewer
        than all only for a trial that stopped within its subset epochs."""
        n = len(self.split.train_labels)
        return self.feed.pool(self.epochs_trained) if self.feed else n

    @property
    def epochs_trained(self) -> int:
        return len(self.history.get("loss", []))

    @property
    def best_val_accuracy(self) -> float:
        values = [v for v in self.history.get("val_accuracy", []) if math.isfinite(v)]
        return max(values) if values else float("nan")

    @property
    def best_epoch(self) -> int:
        values = self.history.get("val_accuracy", [])
        return int(np.nanargmax(values)) if values and not np.all(np.isnan(values)) else -1

    @property
    def val_accuracy(self) -> float:
        """Accuracy of the returned model (the best epoch's, when weights were restored);
        NaN for a run without validation images (a refit on all of them)."""
        if len(self.split.val_labels) == 0:
            return math.nan
        return float(np.mean(self.val_probabilities.argmax(1) == self.split.val_labels))

    @property
    def val_crossentropy(self) -> float:
        """Mean cross-entropy of the returned model on the validation split."""
        if len(self.split.val_labels) == 0:
            return math.nan
        picked = self.val_probabilities[np.arange(len(self.split.val_labels)), self.split.val_labels]
        return float(-np.mean(np.log(np.maximum(picked, 1e-7))))  # Keras clips at 1e-7 too

    @property
    def failure(self) -> Failure | None:
        """Why this run must not count as a result (None when it may): the one judgement
        that a search trial and a plain `digitlab train` both apply.

        - diverged: the loss became NaN or infinite, or the last epoch's loss is more than
          LOSS_EXPLOSION_FACTOR times the first epoch's;
        - no better than chance: the returned model neither picks the right digit clearly
          more often than always answering the most common one (CHANCE_MARGIN), nor gives
          it more probability than a uniform guess (cross-entropy below ln K). The second
          half spares a model that is still learning: a few epochs on little data can
          leave its accuracy near chance while its probabilities already beat a guess,
          whereas a diverged one is confidently wrong and a stuck one stays at ln K.
        """
        losses = self.history.get("loss", [])
        if self.diverged or any(not math.isfinite(v) for v in losses):
            return Failure(DIVERGED, f"diverged: the loss became non-finite at epoch "
                                     f"{self.epochs_trained}")
        if len(losses) >= 2 and losses[-1] > LOSS_EXPLOSION_FACTOR * losses[0]:
            return Failure(DIVERGED, f"diverged: the loss rose from {losses[0]:.4g} in epoch 1 "
                                     f"to {losses[-1]:.4g} in epoch {len(losses)}")
        labels = self.split.val_labels
        if len(labels) == 0:
            return None
        counts = np.bincount(labels)
        chance = counts.max() / len(labels)
        uniform = math.log(np.count_nonzero(counts))
        accuracy, crossentropy = self.val_accuracy, self.val_crossentropy
        # (float32 probabilities of exactly 1/K come out a hair under ln K)
        if accuracy <= chance + CHANCE_MARGIN and not crossentropy < uniform - 1e-4:
            return Failure(NO_BETTER_THAN_CHANCE,
                           f"no better than chance: validation accuracy {accuracy:.3f} (always "
                           f"answering the most common digit scores {chance:.3f}) and "
                           f"cross-entropy {crossentropy:.3f} (a uniform guess scores {uniform:.3f})")
        return None


def run(
    config: ExperimentConfig,
    data: DigitData,
    callbacks: list[keras.callbacks.Callback] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    verbose: int | str = "auto",
    split: Split | None = None,
) -> Result:
    """Build, compile and fit the experiment; evaluate on validation and, if known, holdout.

    `on_epoch(epoch, metrics)` receives every epoch's finite metrics (MLflow logging);
    `callbacks` run after the record (pruning), before the recipe's own. `split`: what the
    run's validation gives it (`validation.fitter`); by default the config's own split."""
    split = split or own_split(config, data)
    runtime.seed_everything(config.seed)
    keras.backend.clear_session()
    # After clear_session, which resets the global dtype policy to float32.
    precision = runtime.set_precision(config.training.mixed_precision)
    classifier = models.build(config)
    augment = models.augmentation(config.augmentation, config.seed)
    # Augmentation layers sit in front of the classifier only while training, so the
    # model that is logged and served never carries them.
    trainable = keras.Sequential([augment, classifier]) if augment else classifier
    trainable.compile(
        optimizer=models.optimizer(config.optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="crossentropy")],
    )
    feed = stream.feed(split.train_labels, config.training, config.seed, config.split_seed)
    recorder = EpochRecorder(on_epoch, stream.images_seen(feed, 1, len(split.train_labels)))
    validation = (split.val_images, split.val_labels) if len(split.val_labels) else None
    started = time.perf_counter()
    trainable.fit(
        **training_batches(split, config.training.batch_size, config.seed, feed),
        epochs=config.training.epochs,
        validation_data=validation,
        callbacks=[recorder, *(callbacks or []), *recipe_callbacks(config)],
        verbose=verbose,
    )
    train_seconds = time.perf_counter() - started

    val_probabilities = predict(classifier, split.val_images)
    holdout_probabilities = holdout_accuracy = None
    if data.test_labels is not None:
        holdout_probabilities = predict(classifier, data.test_images)
        holdout_accuracy = float(np.mean(holdout_probabilities.argmax(1) == data.test_labels))
    return Result(
        config=config,
        model=classifier,
        split=split,
        history=recorder.history,
        val_probabilities=val_probabilities,
        holdout_probabilities=holdout_probabilities,
        holdout_accuracy=holdout_accuracy,
        train_seconds=train_seconds,
        precision=precision,
        diverged=recorder.diverged,
        feed=feed,
        epoch_seconds=tuple(recorder.seconds),
    )


def own_split(config: ExperimentConfig, data: DigitData) -> Split:
    """The config's validation split (`training.validation_fraction`, `split_seed`), checked."""
    data_mod.check_split(data, config.training.validation_fraction)  # callers check first too
    return data_mod.split(data, config.training.validation_fraction, config.split_seed)


def training_batches(split: Split, batch_size: int, seed: int, feed: stream.Feed | None = None) -> dict:
    """`fit` arguments for the training images: every epoch one pass in a new random order,
    or, with a feed (`training.epoch_images`), the feed's batches in its order.

    On TensorFlow this is one endless tf.data stream read `steps_per_epoch` batches at a
    time: given arrays, Keras builds a new iterator every epoch, and on a few CPU cores
    setting it up stalls the start of an epoch for about as long as short epochs take
    (benchmarks/bench_train.py measures a step against plain `fit`).
    """
    if feed is not None:
        return _fed_batches(split, feed)
    if runtime.backend() != "tensorflow":
        return dict(x=split.train_images, y=split.train_labels, batch_size=batch_size, shuffle=True)
    import tensorflow as tf

    n = len(split.train_labels)
    batches = (
        tf.data.Dataset.from_tensor_slices((split.train_images, split.train_labels))
        .shuffle(n, seed=seed)  # a full shuffle, redrawn every pass
        .batch(batch_size)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    return dict(x=batches, steps_per_epoch=math.ceil(n / batch_size), shuffle=False)  # shuffled above


def _fed_batches(split: Split, feed: stream.Feed) -> dict:
    """The feed's batches: gathered from the training images by index (the images are held
    once; the order is a small int32 array). A gather is cheap next to a training step, so
    the map runs in line and prefetching overlaps it with the step."""
    steps, order = feed.steps_per_epoch, feed.order.reshape(-1, feed.batch_size)
    images, labels = split.train_images, split.train_labels
    if runtime.backend() != "tensorflow":
        def batches():
            while True:  # Keras stops after epochs x steps; early stopping stops sooner
                for rows in order:
                    yield images[rows], labels[rows]

        return dict(x=batches(), steps_per_epoch=steps, shuffle=False)
    import tensorflow as tf

    held_images, held_labels = tf.constant(images), tf.constant(labels)
    batches = (
        tf.data.Dataset.from_tensor_slices(order)
        .map(lambda rows: (tf.gather(held_images, rows), tf.gather(held_labels, rows)))
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    return dict(x=batches, steps_per_epoch=steps, shuffle=False)


TIMED_BATCHES = 16  # per timed epoch: enough to average out a step's jitter, a few seconds
TIMED_EPOCHS = 3  # the first also builds and compiles the model; the fastest of the others counts


def time_step(config: ExperimentConfig, data: DigitData, split: Split) -> tuple[float, float]:
    """Seconds of one training batch and of one validation pass of `config` on `split`,
    from a few short untracked epochs: what a search's budget plan and `digitlab train`'s
    length line extrapolate from. Each is timed once warm (the first epoch compiles the
    training and evaluation functions, the first predict its own), since a plan that
    counts compilation into every step overstates a long run several times over."""
    import dataclasses

    t = config.training
    timed = dataclasses.replace(config, training=dataclasses.replace(
        t, epochs=TIMED_EPOCHS, epoch_images=TIMED_BATCHES * t.batch_size, subset_images=0,
        subset_epochs=0, early_stopping=dataclasses.replace(t.early_stopping, enabled=False),
        reduce_lr=dataclasses.replace(t.reduce_lr, enabled=False), average_last_epochs=0,
        restore_best=False))
    result = run(timed, data, split=split, verbose=0)
    val_seconds = float("inf")
    for _ in range(2):  # the first call traces the predict function
        started = time.perf_counter()
        predict(result.model, split.val_images)
        val_seconds = min(val_seconds, time.perf_counter() - started)
    epoch = min(result.epoch_seconds[1:])
    return max(epoch - val_seconds, 0.0) / TIMED_BATCHES, val_seconds


def length_line(config: ExperimentConfig, data: DigitData) -> str:
    """What `config` trains on `data` and how long that takes here, timed as a search's
    plan is: "kaggle_cnn: 30 epochs of one pass (1,134,000 images, 30 passes over 37,800
    training images); about 28.0 min here"."""
    t = config.training
    split = own_split(config, data)
    step, val_seconds = time_step(config, data, split)
    n = len(split.train_labels)
    steps = math.ceil((t.epoch_images or n) / t.batch_size)
    images = t.epochs * (steps * t.batch_size if t.epoch_images else n)
    epoch = f"{steps * t.batch_size:,} images" if t.epoch_images else "one pass"
    seconds = t.epochs * (steps * step + val_seconds)
    return (f"{config.name}: {t.epochs} epochs of {epoch} ({images:,} images, {images / n:.3g} passes "
            f"over {n:,} training images); about {console.duration(seconds)} here")


def predict(model: keras.Model, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    if len(images) == 0:  # Keras's predict fails on no rows (a refit has no validation images)
        return np.zeros((0, 10), dtype=np.float32)
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)
