"""What one `digitlab search` invocation was asked to do."""

from __future__ import annotations

import time
from dataclasses import dataclass

from digitlab.search.space import SearchSpace

ENGINES = ("optuna", "kerastuner")


@dataclass(frozen=True)
class Settings:
    space: SearchSpace  # with any --trials / --max-epochs already applied to its budget
    engine: str
    study: str
    storage: str | None
    workers: int
    data_dir: str | None
    seed: int
    # time.time() after which no trial starts; set when the search starts (budget.minutes)
    deadline: float | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def trials(self) -> int:
        return self.space.trials

    @property
    def max_epochs(self) -> int:
        return self.space.max_epochs
