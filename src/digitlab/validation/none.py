"""Nothing held out: final models and refits train on every labelled image."""

from __future__ import annotations

import dataclasses

import numpy as np

from digitlab.validation.base import Validation, seed_field


@dataclasses.dataclass(frozen=True)
class AllImages(Validation):
    kind = "none"
    holds_out = False

    # nothing is drawn by it: final models of different seeds are validated alike
    seed: int | None = dataclasses.field(default=None, kw_only=True, compare=False,
                                         metadata=seed_field().metadata)

    @property
    def n_splits(self) -> int:
        return 1

    def index_splits(self, labels, seed):
        return [(np.arange(len(labels)), np.arange(0))]
