"""The contract between a study and the engine that samples its trials.

`runner.run_study` drives any engine through these methods; `optuna_engine` and
`kerastuner_engine` adapt Optuna and KerasTuner to it. Each engine draws a trial's
values from the search file's parameters (`params`), hands them to `trial.run_trial`
(the one tracked-run path) and records the outcome in its own storage. The engine
keeps the loop (`work`): KerasTuner's `tuner.search()` owns its loop, so the contract
is the loop, not single steps.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from digitlab.data import DigitData
from digitlab.search.settings import Settings


class Engine(Protocol):
    name: str
    settings: Settings

    def check_compatible(self) -> None:
        """Record a new study's search file, or refuse to resume one made from another."""

    @property
    def parent_run_id(self) -> str | None:
        """The study's parent MLflow run, once one exists (read fresh from the storage)."""

    def set_parent_run_id(self, run_id: str) -> None: ...

    def lock(self) -> AbstractContextManager[Any]:
        """One worker at a time in the study's critical sections (budget, parent run)."""

    def finished(self) -> int:
        """Trials that count toward the budget (COMPLETE, PRUNED, failed on their own)."""

    def recover_interrupted(self, end_run) -> list[int]:
        """Trials a dead process left running: failed, their runs ended KILLED (`end_run`),
        queued once more; returns their numbers."""

    def work(self, data: DigitData, parent_run_id: str, experiment_id: str) -> None:
        """Run trials until the budget (shared with other workers) or the time is used up."""

    def rows(self) -> list[dict]:
        """Every trial as a row: number, state, value, epochs, run_id, fail_reason,
        retry_of, and `params.<key>` for each sampled value."""
