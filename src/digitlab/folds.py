"""K-fold validation: stratified folds drawn from a seed, one model per fold, and the
out-of-fold (OOF) predictions that score a trial on every labelled training image.

A search file's `validation: {folds: K}` (or `digitlab search --folds K`) makes each trial
train K models through `train.run`, fold i held out from model i, all inside the trial's one
MLflow run (`FoldTrainer` is the `fit` that `tracked.tracked_run` calls). Every image is
predicted once, by the model that never saw it: those predictions are the trial's
objective, and the K models, averaged, are what `digitlab promote` registers.

Imports nothing heavy: the search file and the data are checked before TensorFlow loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from digitlab.data import DigitData, Split
from digitlab.errors import DataError

log = logging.getLogger("digitlab.search")

# The objective of a K-fold study, by the search file's metric: the same measure taken on
# the out-of-fold predictions. Other metrics (loss, val_loss, ...) are per-epoch values of
# one training run and have no out-of-fold counterpart.
OOF_METRICS = {"val_accuracy": "oof_accuracy", "val_crossentropy": "oof_crossentropy"}
MODEL_NAME = "fold_{}"  # the logged model of fold i (from 1): fold_1 ... fold_K


def assign(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every image: each digit spread evenly over the folds.

    Written out rather than taken from scikit-learn's StratifiedKFold (only a dependency of
    a dependency here): a few lines of numpy, and the folds stay the same whatever version
    of another library is installed, which the registry relies on when it recomputes them
    from a run's tags. Each class is shuffled by the seed and dealt round-robin, the deal
    continuing from class to class, so the folds differ in size by one image at most.
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (dealt + np.arange(len(idx))) % k
        dealt += len(idx)
    return fold


def fold_split(data: DigitData, fold: np.ndarray, i: int, seed: int) -> Split:
    """Fold i held out for validation, the other folds to train on (in a seeded order)."""
    val_idx = np.flatnonzero(fold == i)
    train_idx = np.random.default_rng([seed, i]).permutation(np.flatnonzero(fold != i))
    return Split(train_images=data.train_images[train_idx], train_labels=data.train_labels[train_idx],
                 val_images=data.train_images[val_idx], val_labels=data.train_labels[val_idx],
                 val_rows=val_idx)


def check(data: DigitData, k: int) -> None:
    """Raise DataError unless every digit present has at least K images, so that every fold
    validates on every digit and every model trains on it. Callers run this before any
    study or run exists."""
    if len(data.train_labels) == 0:
        raise DataError(f"{data.source}: no training images")
    classes, counts = np.unique(data.train_labels, return_counts=True)
    for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
        if n < k:
            raise DataError(f"{data.source}: digit {c} has {n} training image{'s' if n != 1 else ''}; "
                            f"{k}-fold validation needs at least {k} of every digit (use fewer folds)")


def mean_history(histories: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Each metric's per-epoch mean over the folds that trained that epoch."""
    out: dict[str, list[float]] = {}
    for key in dict.fromkeys(k for h in histories for k in h):
        series = [h[key] for h in histories if key in h]
        out[key] = [float(np.mean([s[e] for s in series if e < len(s)]))
                    for e in range(max(map(len, series)))]
    return out


def combine(results: list, data: DigitData, fold: np.ndarray):
    """The K fold results as one `train.Result` scored out of fold: its validation split is
    every training image, each predicted by the model that held it out, so `val_accuracy`,
    `val_crossentropy`, the failure check and the confusion matrix are out-of-fold values.
    Holdout probabilities are the fold models' mean: the model that promote registers."""
    from digitlab import train

    oof = np.zeros((len(data.train_labels), 10), dtype=np.float32)
    for i, result in enumerate(results):
        oof[fold == i] = result.val_probabilities
    holdout = holdout_accuracy = None
    if results[0].holdout_probabilities is not None:
        holdout = np.mean([r.holdout_probabilities for r in results], axis=0).astype(np.float32)
        holdout_accuracy = float(np.mean(holdout.argmax(1) == data.test_labels))
    everything = Split(data.train_images, data.train_labels, data.train_images, data.train_labels,
                       val_rows=np.arange(len(data.train_labels)))
    return train.Result(
        config=results[0].config, model=results[0].model, split=everything,
        history=mean_history([r.history for r in results]), val_probabilities=oof,
        holdout_probabilities=holdout, holdout_accuracy=holdout_accuracy,
        train_seconds=sum(r.train_seconds for r in results), precision=results[0].precision,
        diverged=any(r.diverged for r in results))


class FoldTrainer:
    """The `fit` of a K-fold trial: `train.run` once per fold, in the trial's one run.

    Per-fold curves go into that run with the fold in the metric's name (`fold2_val_accuracy`,
    step = epoch) rather than into nested runs: the runs table keeps one row per trial,
    which is what the search ranks, promotes and recovers after a crash (a killed trial's
    run ends KILLED, with no fold runs left RUNNING below it); the plain names
    (`val_accuracy`, ...) carry the mean over the folds, so trials of single-split and
    K-fold studies chart alike.

    The callbacks (the engine's pruning hook) watch the first fold only: the engine judges
    the trial on it, and a trial pruned there, or one whose fold diverged, trains no
    further fold and returns that fold's own result.
    """

    def __init__(self, k: int, number: int | str) -> None:
        self.k, self.number = k, number
        self.results: list = []

    def __call__(self, config, data: DigitData, callbacks: Sequence = (),
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                 verbose: int | str = "auto"):
        from digitlab import train

        fold = assign(data.train_labels, self.k, config.split_seed)
        self.results = []
        for i in range(self.k):
            split = fold_split(data, fold, i, config.split_seed)
            log.info("trial %s fold %d/%d: training on %d images, validating on %d", self.number,
                     i + 1, self.k, len(split.train_labels), len(split.val_labels))
            result = train.run(config, data, callbacks=list(callbacks) if i == 0 else [],
                               on_epoch=_prefixed(on_epoch, f"fold{i + 1}_"), verbose=verbose,
                               split=split)
            # The fold's training images are a copy of (K-1)/K of the data: let them go
            # before the next fold (the held-out ones stay for the figures and signature).
            result.split = Split(split.train_images[:0], split.train_labels[:0],
                                 split.val_images, split.val_labels, split.val_rows)
            self.results.append(result)
            if any(getattr(c, "pruned_at", None) is not None for c in callbacks):
                break
            failure = result.failure
            if failure is not None and failure.reason == train.DIVERGED:
                log.info("trial %s fold %d/%d diverged: no further fold is trained", self.number,
                         i + 1, self.k)
                break
        history = mean_history([r.history for r in self.results])
        if on_epoch is not None:
            for epoch in range(len(history.get("loss", []))):
                on_epoch(epoch + 1, {k: v[epoch] for k, v in history.items()
                                     if epoch < len(v) and np.isfinite(v[epoch])})
        if len(self.results) < self.k:
            return self.results[-1]
        return combine(self.results, data, fold)

    def log_models(self) -> None:
        """The K fold models into the active run, as `fold_1` ... `fold_K`."""
        import mlflow
        from mlflow.models import infer_signature

        from digitlab import tracking

        requirements = [f"{p}=={v}" for p, v in tracking.package_versions().items() if p != "mlflow"]
        for i, result in enumerate(self.results):
            mlflow.keras.log_model(
                result.model, name=MODEL_NAME.format(i + 1), pip_requirements=requirements,
                signature=infer_signature(result.split.val_images[:2], result.val_probabilities[:2]))


def _prefixed(on_epoch, prefix: str):
    if on_epoch is None:
        return None
    return lambda epoch, metrics: on_epoch(epoch, {prefix + k: v for k, v in metrics.items()})


def oof_probabilities(groups: list[list], data: DigitData, k: int, seed: int, tta: bool,
                      weights: list[float] | None = None) -> np.ndarray:
    """Out-of-fold class probabilities of an ensemble of K-fold trials, as served.

    `groups[m][i]` is member m's model of fold i. Every training image is predicted by the
    fold models that held it out (one per member, averaged as the serving model averages,
    over the same shifts with `tta`); averaging every model over every image would score
    models on images they trained on.
    """
    from digitlab import serving

    fold = assign(data.train_labels, k, seed)
    out = np.zeros((len(data.train_labels), 10), dtype=np.float32)
    for i in range(k):
        # one model per member (its fold i), one weight per member
        classifier = serving.DigitClassifier([group[i] for group in groups], tta, weights)
        out[fold == i] = classifier.probabilities(data.train_images[fold == i])
    return out
