"""A repeated stratified holdout: `repeats` held-out splits of `fraction` of the labelled
images, each drawn by its own seed, one model per split. The run is scored on the images
held out at least once, each by the mean of the models that held it out; cheaper than K
folds when `repeats` x `fraction` < 1, and less dependent on one split than a holdout."""

from __future__ import annotations

import dataclasses

from digitlab import data as data_mod
from digitlab.validation.base import Validation, seed_field


@dataclasses.dataclass(frozen=True)
class RepeatedHoldout(Validation):
    kind = "repeated"
    label_format = "{repeats} holdouts of {fraction:g}"
    suffix_format = "{repeats}x{fraction:g}"

    repeats: int  # R >= 2 splits, so R models per trial
    fraction: float  # share of each digit's images each split holds out
    seed: int | None = seed_field()

    @property
    def n_splits(self) -> int:
        return self.repeats

    def index_splits(self, labels, seed):
        return [data_mod.split_indices(labels, self.fraction, [seed, r]) for r in range(self.repeats)]

    def check_data(self, data):
        data_mod.check_split(data, self.fraction)

    def problems(self):
        return [message for ok, message in (
            (self.repeats >= 2, "repeats must be a whole number of at least 2"),
            (0 < self.fraction < 1, "fraction must be a number between 0 and 1")) if not ok]
