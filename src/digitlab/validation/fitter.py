"""The one fitter of every kind of validation: `train.run` once per split, in the run's one
MLflow run, and the results combined; the models a run logs; an ensemble's score on what
its members held out.

Per-split curves go into the run with the split in the metric's name (`fold2_val_accuracy`,
step = epoch) rather than into nested runs: the runs table keeps one row per trial, which
is what the search ranks, promotes and recovers after a crash (a killed trial's run ends
KILLED, with no split runs left RUNNING below it); the plain names (`val_accuracy`, ...)
carry the mean over the splits, so trials of every kind chart alike.

The callbacks (the engine's pruning hook) watch the first split only: the engine judges
the trial on it, and a trial pruned there, or one whose split diverged, trains no further
split and returns that split's own result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from digitlab import data as data_mod
from digitlab.data import DigitData, Split

log = logging.getLogger("digitlab.search")


def fit(scheme, config, data: DigitData, callbacks: Sequence = (), on_epoch=None,
        verbose: int | str = "auto", label: str = ""):
    """`config` trained once per split of `scheme` (resolved: its seed set)."""
    from digitlab import train

    splits = scheme.index_splits(data.train_labels, scheme.seed)
    if len(splits) == 1:
        return train.run(config, data, callbacks=list(callbacks), on_epoch=on_epoch, verbose=verbose,
                         split=data_mod.take(data, *splits[0]))
    results = []
    for i, rows in enumerate(splits):
        split = data_mod.take(data, *rows)
        log.info("%s split %d/%d: training on %d images, validating on %d", label, i + 1,
                 len(splits), len(split.train_labels), len(split.val_labels))
        result = train.run(config, data, callbacks=list(callbacks) if i == 0 else [],
                           on_epoch=_prefixed(on_epoch, f"fold{i + 1}_"), verbose=verbose, split=split)
        # The split's training images are a copy of most of the data: let them go before
        # the next split (the held-out ones stay for the figures and signature).
        result.split = Split(split.train_images[:0], split.train_labels[:0],
                             split.val_images, split.val_labels, split.val_rows)
        results.append(result)
        if any(getattr(c, "pruned_at", None) is not None for c in callbacks):
            break
        failure = result.failure
        if failure is not None and failure.reason == train.DIVERGED:
            log.info("%s split %d/%d diverged: no further split is trained", label, i + 1, len(splits))
            break
    history = mean_history([r.history for r in results])
    if on_epoch is not None:
        for epoch in range(len(history.get("loss", []))):
            on_epoch(epoch + 1, {k: v[epoch] for k, v in history.items()
                                 if epoch < len(v) and np.isfinite(v[epoch])})
    if len(results) < len(splits):
        return results[-1]
    return combine(results, data)


def mean_history(histories: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Each metric's per-epoch mean over the splits that trained that epoch."""
    out: dict[str, list[float]] = {}
    for key in dict.fromkeys(k for h in histories for k in h):
        series = [h[key] for h in histories if key in h]
        out[key] = [float(np.mean([s[e] for s in series if e < len(s)]))
                    for e in range(max(map(len, series)))]
    return out


def pooled(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows held out at least once, their mean probabilities) from (rows, probabilities)
    of each split."""
    sums = np.zeros((n, 10), dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    for rows, probabilities in parts:
        sums[rows] += probabilities
        counts[rows] += 1
    rows = np.flatnonzero(counts)
    return rows, (sums[rows] / counts[rows, None]).astype(np.float32)


def combine(results: list, data: DigitData):
    """The split results as one `train.Result` scored out of fold: its validation images
    are those held out at least once, each predicted by the models that held it out, so
    `val_accuracy`, `val_crossentropy`, the failure check and the confusion matrix are
    out-of-fold values. Holdout probabilities are the models' mean: the model that promote
    registers."""
    from digitlab import train

    rows, probabilities = pooled([(r.split.val_rows, r.val_probabilities) for r in results],
                                 len(data.train_labels))
    holdout = holdout_accuracy = None
    if results[0].holdout_probabilities is not None:
        holdout = np.mean([r.holdout_probabilities for r in results], axis=0).astype(np.float32)
        holdout_accuracy = float(np.mean(holdout.argmax(1) == data.test_labels))
    held = Split(data.train_images, data.train_labels, data.train_images[rows],
                 data.train_labels[rows], val_rows=rows)
    return train.Result(
        config=results[0].config, model=results[0].model, split=held,
        history=mean_history([r.history for r in results]), val_probabilities=probabilities,
        holdout_probabilities=holdout, holdout_accuracy=holdout_accuracy,
        train_seconds=sum(r.train_seconds for r in results), precision=results[0].precision,
        diverged=any(r.diverged for r in results), parts=tuple(results))


def log_models(scheme, result) -> None:
    """A run's models into the active run: its one model as `model`, or one per split as
    `fold_1` ... `fold_N`."""
    import mlflow
    from mlflow.models import infer_signature

    from digitlab import tracking
    from digitlab.validation.base import MODEL_NAME

    if not result.parts:
        tracking.log_model(result)
        return
    requirements = [f"{p}=={v}" for p, v in tracking.package_versions().items() if p != "mlflow"]
    for i, part in enumerate(result.parts):
        mlflow.keras.log_model(
            part.model, name=MODEL_NAME.format(i + 1), pip_requirements=requirements,
            signature=infer_signature(part.split.val_images[:2], part.val_probabilities[:2]))


def held_out_accuracy(scheme, groups: list[list], data: DigitData, tta: bool,
                      weights: list[float] | None = None) -> float:
    from digitlab import serving

    parts = []
    for i, (_, held) in enumerate(scheme.splits(data.train_labels)):
        # one model per member (its split i), one weight per member
        classifier = serving.DigitClassifier([group[i] for group in groups], tta, weights)
        parts.append((held, classifier.probabilities(data.train_images[held])))
    rows, probabilities = pooled(parts, len(data.train_labels))
    return float(np.mean(probabilities.argmax(1) == data.train_labels[rows]))


def _prefixed(on_epoch, prefix: str):
    if on_epoch is None:
        return None
    return lambda epoch, metrics: on_epoch(epoch, {prefix + k: v for k, v in metrics.items()})

