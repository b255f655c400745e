"""One stratified held-out split: `fraction` of the labelled images (the config's
`training.validation_fraction` unless the search file gives it), by the split seed."""

from __future__ import annotations

import dataclasses

from digitlab import data as data_mod
from digitlab.validation.base import Validation, seed_field


@dataclasses.dataclass(frozen=True)
class Holdout(Validation):
    kind = "holdout"

    fraction: float | None = None  # share of each digit's images held out; none: the experiment's
    seed: int | None = seed_field()

    @property
    def n_splits(self) -> int:
        return 1

    def index_splits(self, labels, seed):
        return [data_mod.split_indices(labels, self.fraction, seed)]

    def check_data(self, data):
        data_mod.check_split(data, self.fraction)

    def problems(self):
        return [] if self.fraction is None or 0 < self.fraction < 1 else [
            "fraction must be a number between 0 and 1"]

    def with_config(self, config):
        if self.fraction is not None:
            return self
        return dataclasses.replace(self, fraction=config.training.validation_fraction)
