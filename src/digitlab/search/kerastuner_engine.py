"""KerasTuner engine: Hyperband, random or Bayesian search over the same space file.

KerasTuner keeps its study in a directory (`--storage`, default `kerastuner/`,
one project per study). Beside its own files we keep `digitlab.json`: the space
fingerprint, the parent MLflow run and each trial's MLflow run. Hyperband gives
each trial its number of epochs (`tuner/epochs`); trials train from scratch.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from digitlab import console, osutil
from digitlab.errors import SearchFailed, UserError
from digitlab.search import params
from digitlab.search import settings as settings_mod
from digitlab.search import trial as trial_mod
from digitlab.search.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "kerastuner"


class OutOfTime(Exception):
    """Raised between trials to end `tuner.search()` when budget.minutes have passed."""


def _oracle(settings: Settings):
    import keras_tuner as kt

    study_file = settings.study_file
    common = dict(
        objective=kt.Objective(study_file.objective.metric,
                               "max" if study_file.objective.direction == "maximize" else "min"),
        hyperparameters=params.kerastuner_hyperparameters(study_file.params),
        allow_new_entries=False,
        tune_new_entries=False,
        seed=settings.seed,
        max_consecutive_failed_trials=study_file.max_consecutive_failures,
    )
    if study_file.kerastuner.tuner == "hyperband":
        # Many brackets, so that the trial budget below, not Hyperband, ends the search.
        oracle_class = kt.oracles.HyperbandOracle
        options = dict(max_epochs=settings.max_epochs, factor=3, hyperband_iterations=1000)
    elif study_file.kerastuner.tuner == "bayesian":
        oracle_class, options = kt.oracles.BayesianOptimizationOracle, {}
    else:
        oracle_class, options = kt.oracles.RandomSearchOracle, {}
    oracle = _starting(oracle_class, study_file.start)(**options, **common)
    oracle.max_trials = settings.trials  # Hyperband takes no max_trials argument
    return oracle


def _starting(oracle_class, start: dict[str, Any]):
    """The oracle, drawing the space's start values for the first trial of a new study.

    Every KerasTuner oracle draws a new trial's values in `_random_values` (Hyperband
    for a bracket's first round, Bayesian for its initial points), so the start
    values go in there; keys that start does not give stay random.
    """
    class Starting(oracle_class):
        def _random_values(self):
            values = super()._random_values()
            if start and values is not None and not self.trials:  # no trial yet: a new study
                values.update({k: params.encode(v) for k, v in start.items()})
            return values

    return Starting


class KerasTunerEngine:
    name = "kerastuner"

    def __init__(self, settings: Settings) -> None:
        import keras_tuner as kt

        self.settings = settings
        self.directory = Path(settings.storage or DEFAULT_DIRECTORY)
        self.project = self.directory / settings.study
        self.sidecar = self.project / "digitlab.json"
        self.state: dict[str, Any] = json.loads(self.sidecar.read_text()) if self.sidecar.exists() else {}
        engine = self

        class Tuner(kt.Tuner):
            def run_trial(self, trial, *args, **kwargs):
                return engine._run(trial)

            def on_trial_end(self, trial):
                super().on_trial_end(trial)  # records and saves the trial first
                # The time budget, checked after each trial as the Optuna engine does.
                if engine.settings.out_of_time():
                    raise OutOfTime

        # overwrite=False: an existing project is reloaded, which is how a study resumes.
        self.tuner = Tuner(oracle=_oracle(settings), directory=str(self.directory),
                           project_name=settings.study, overwrite=False)
        self.data = self.parent = self.experiment_id = None

    def lock(self):
        return contextlib.nullcontext()  # one process per KerasTuner study

    def _save(self) -> None:
        osutil.atomic_write(self.sidecar, json.dumps(self.state, indent=1))

    def check_compatible(self) -> None:
        fingerprint = self.settings.study_file.fingerprint()
        settings_mod.check_data(self.settings, self.state.get("data_digest"))
        if self.settings.data_digest and "data_digest" not in self.state:
            self.state["data_digest"] = self.settings.data_digest
            self._save()
        if "space_fingerprint" not in self.state:
            self.state.update(space_fingerprint=fingerprint, space_path=self.settings.study_file.path,
                              direction=self.settings.study_file.objective.direction, runs={})
            self._save()
        elif self.state["space_fingerprint"] != fingerprint:
            raise UserError(
                f"study {self.settings.study!r} ({self.project}) was created from a different "
                f"search space ({self.state.get('space_path')}); resume it with the same file or "
                "use another --study name"
            )

    @property
    def parent_run_id(self) -> str | None:
        return self.state.get("parent_run_id")

    def set_parent_run_id(self, run_id: str) -> None:
        self.state["parent_run_id"] = run_id
        self._save()

    def _trials(self):
        return list(self.tuner.oracle.trials.values())

    def finished(self) -> int:
        return sum(t.status in ("COMPLETED", "FAILED") for t in self._trials())

    def recover_interrupted(self, end_run) -> list[int]:
        """KerasTuner requeues trials that were running when its process died: their
        interrupted runs end KILLED, and the retry becomes a new run tagged retry_of."""
        recovered = []
        # The oracle keeps the trials it will run again in `_retry_queue` and offers no
        # public view of it; it is the only record of which trials a dead process left.
        for trial_id in list(self.tuner.oracle._retry_queue):
            if run_id := self.state["runs"].get(trial_id):
                end_run(run_id)
                self.state.setdefault("interrupted", {})[trial_id] = run_id
                recovered.append(int(trial_id))
        self._save()
        return recovered

    def work(self, data, parent_run_id: str, experiment_id: str) -> None:
        self.data, self.parent, self.experiment_id = data, parent_run_id, experiment_id
        if self.settings.out_of_time():  # checked again after each trial (on_trial_end)
            return
        try:
            self.tuner.search()
        except OutOfTime:
            return
        except RuntimeError as exc:
            if "consecutive failures" in str(exc).lower():
                raise SearchFailed(f"{exc} (kerastuner); stopping the search") from None
            raise

    def _run(self, trial) -> dict[str, float]:
        study_file = self.settings.study_file
        values = {p.key: params.rounded(trial.hyperparameters.get(p.key)) for p in study_file.params}
        epochs = trial.hyperparameters.values.get("tuner/epochs")
        log.info("trial %s: %s%s", trial.trial_id, console.values(values),
                 f" for {epochs} epochs" if epochs else "")

        def started(run_id: str) -> None:
            previous = self.state.get("interrupted", {}).get(trial.trial_id)
            if previous:
                import mlflow

                mlflow.set_tag("retry_of", previous)
            self.state["runs"][trial.trial_id] = run_id
            self._save()

        outcome = trial_mod.run_trial(
            study_file, values, data=self.data, seed=self.settings.seed, engine=self.name,
            number=int(trial.trial_id), parent_run_id=self.parent, experiment_id=self.experiment_id,
            epochs=int(epochs) if epochs else None, on_start=started,
        )
        if outcome.state != trial_mod.COMPLETE:
            raise RuntimeError(outcome.error or "trial failed")  # KerasTuner marks it FAILED
        return {study_file.objective.metric: outcome.value}

    def rows(self) -> list[dict]:
        rows = []
        for t in sorted(self._trials(), key=lambda t: t.trial_id):
            state = {"COMPLETED": "COMPLETE", "FAILED": "FAIL", "INVALID": "FAIL"}.get(t.status, t.status)
            values = t.hyperparameters.values
            rows.append({
                "number": int(t.trial_id),
                "state": state,
                "value": t.score if state == "COMPLETE" else None,
                "epochs": values.get("tuner/epochs", self.settings.max_epochs),
                "run_id": self.state.get("runs", {}).get(t.trial_id),
                "fail_reason": (t.message or "").strip().splitlines()[-1] if t.message else None,
                "retry_of": self.state.get("interrupted", {}).get(t.trial_id),
                **{f"params.{p.key}": values.get(p.key) for p in self.settings.study_file.params},
            })
        return rows
