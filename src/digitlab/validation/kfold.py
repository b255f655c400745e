"""K stratified folds: K models per run, model i validated on fold i, the run scored out
of fold on every labelled image."""

from __future__ import annotations

import dataclasses

import numpy as np

from digitlab.errors import DataError
from digitlab.validation.base import Validation, seed_field


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


@dataclasses.dataclass(frozen=True)
class KFold(Validation):
    kind = "kfold"
    label_format = "{folds}-fold"
    suffix_format = "{folds}fold"
    covers_every_image = True

    folds: int  # K >= 2: K models per trial, each holding out one fold
    seed: int | None = seed_field()

    @property
    def n_splits(self) -> int:
        return self.folds

    def index_splits(self, labels, seed):
        fold = assign(labels, self.folds, seed)
        # each fold's training rows in a seeded order of their own
        return [(np.random.default_rng([seed, i]).permutation(np.flatnonzero(fold != i)),
                 np.flatnonzero(fold == i)) for i in range(self.folds)]

    def check_data(self, data):
        """Every digit present has at least K images, so that every fold validates on every
        digit and every model trains on it."""
        if len(data.train_labels) == 0:
            raise DataError(f"{data.source}: no training images")
        classes, counts = np.unique(data.train_labels, return_counts=True)
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            if n < self.folds:
                raise DataError(f"{data.source}: digit {c} has {n} training image{'s' if n != 1 else ''}; "
                                f"{self.folds}-fold validation needs at least {self.folds} of every "
                                "digit (use fewer folds)")

    def problems(self):
        return [] if self.folds >= 2 else ["folds must be a whole number of at least 2"]
