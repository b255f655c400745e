"""Optuna engine: a persistent study, per-epoch pruning, crash recovery, a shared budget.

The adapter between the engine contract (`search/engine.py`) and an Optuna study; the
storage, the study lock and heartbeats are in `coordination`, the parameter mapping in
`params`.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import optuna
from optuna.trial import TrialState

from digitlab import console, osutil
from digitlab.errors import SearchFailed, UserError
from digitlab.search import coordination, params, parent_run
from digitlab.search import settings as settings_mod
from digitlab.search import trial as trial_mod
from digitlab.search.settings import Settings

log = logging.getLogger(__name__)
if not console.verbose():
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..." and the like

# A trial left RUNNING by a dead process is failed with this reason and retried once.
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"


def _stale_trial_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker stopped sending heartbeats (on any machine): as on resume,
    its MLflow run ends KILLED and its parameters are queued once more."""
    # Optuna has already finished the trial, so it takes no new attributes: a FAIL
    # trial without a fail_reason is one whose worker died (see counts_toward_budget).
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        parent_run.end_trial_run_killed(run_id)
    if RETRY_OF not in trial.user_attrs:
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number}, skip_if_exists=False)


def _sampler(settings: Settings, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws one trial's values, seeded by the study's seed and the trial's
    number. Seeded by the study's seed alone, every process's sampler would start from the
    same state, so a second worker, or the same command resuming the study, would draw the
    very values of the trials before it.
    """
    seed = int(np.random.SeedSequence([settings.seed % 2**32, trial_number]).generate_state(1)[0])
    if settings.study_file.optuna.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(3, settings.trials // 3))
    # constant_liar (Optuna 5's default, named so it stays): trials still running on other
    # workers count as poor results, so concurrent workers do not propose the same region.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _pruner(settings: Settings) -> optuna.pruners.BasePruner:
    if settings.study_file.optuna.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.study_file.optuna.min_epochs,
                                              max_resource=settings.max_epochs, reduction_factor=3)
    if settings.study_file.optuna.pruner == "median":
        # Steps are epochs counted from 1, so the first judgement comes after min_epochs epochs.
        return optuna.pruners.MedianPruner(n_startup_trials=3,
                                           n_warmup_steps=settings.study_file.optuna.min_epochs)
    return optuna.pruners.NopPruner()


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Trials that ended on their own; one killed with its process is retried instead."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get("fail_reason", INTERRUPTED) != INTERRUPTED


class OptunaEngine:
    name = "optuna"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage_url = settings.storage or coordination.DEFAULT_STORAGE
        self.storage = coordination.storage_for(self.storage_url, _stale_trial_failed)
        self.study = optuna.create_study(
            storage=self.storage,
            study_name=settings.study,
            sampler=_sampler(settings, 0),  # replaced for each trial (work)
            pruner=_pruner(settings),
            direction=settings.study_file.objective.direction,
            load_if_exists=True,
        )

    # --- study bookkeeping ------------------------------------------------------

    def check_compatible(self) -> None:
        """A resumed study must have the same space and direction; a new one records them."""
        attrs = self.study.user_attrs
        study_file = self.settings.study_file
        settings_mod.check_data(self.settings, attrs.get("data_digest"))
        if self.settings.data_digest and "data_digest" not in attrs:
            self.study.set_user_attr("data_digest", self.settings.data_digest)
        if "space_fingerprint" not in attrs:
            self.study.set_user_attr("space_fingerprint", study_file.fingerprint())
            self.study.set_user_attr("space_path", study_file.path)
            self.study.set_user_attr("engine", self.name)
            self.study.set_metric_names([study_file.objective.metric])  # named in optuna-dashboard and plots
            if study_file.start:  # the first trial of a new study; TPE samples any key not given
                self.study.enqueue_trial({k: params.encode(v) for k, v in study_file.start.items()},
                                         skip_if_exists=True)
            return
        if self.study.direction.name.lower() != study_file.objective.direction:
            raise UserError(
                f"study {self.settings.study!r} maximises/minimises differently "
                f"({self.study.direction.name.lower()}) from {study_file.path} "
                f"({study_file.objective.direction}); "
                "use another --study name"
            )
        if attrs["space_fingerprint"] != study_file.fingerprint():
            raise UserError(
                f"study {self.settings.study!r} was created from a different search file "
                f"({attrs.get('space_path')}); resume it with the same file or use another --study name"
            )

    @property
    def parent_run_id(self) -> str | None:
        # user_attrs reads the storage each time: another machine may have just created it
        return self.study.user_attrs.get("mlflow_parent_run_id")

    def set_parent_run_id(self, run_id: str) -> None:
        self.study.set_user_attr("mlflow_parent_run_id", run_id)

    def finished(self) -> int:
        return sum(counts_toward_budget(t) for t in self.study.get_trials(deepcopy=False))

    def recover_interrupted(self, end_run) -> list[int]:
        """Fail trials whose process on this machine is gone, end their runs KILLED,
        and queue their parameters once more (a retried trial is not retried again)."""
        recovered = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not osutil.owner_is_gone(str(t.user_attrs.get("worker", ""))):
                continue  # alive, or another machine's trial: heartbeats (RDB storage) cover those
            # A told trial takes no attributes, and only the storage API sets one on a trial
            # that is not this process's own: it takes the internal id.
            self.storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
            self.study.tell(t.number, state=TrialState.FAIL)
            if run_id := t.user_attrs.get("mlflow_run_id"):
                end_run(run_id)
            if RETRY_OF not in t.user_attrs:
                self.study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number},
                                         skip_if_exists=False)
            recovered.append(t.number)
        return recovered

    def lock(self):
        return coordination.study_lock(self.storage_url, self.storage, self.settings.study)

    def _reserve(self) -> optuna.Trial | None:
        """Start a trial only while finished + running trials are under the budget.

        Counting and asking happen under the study lock, so parallel workers never
        overshoot the shared budget. While the budget is taken but trials are still
        running elsewhere, wait: one of them may die and leave its place to retry.
        """
        while True:
            with self.lock():
                if coordination.is_rdb(self.storage_url):
                    optuna.storages.fail_stale_trials(self.study)
                self.recover_interrupted(parent_run.end_trial_run_killed)
                trials = self.study.get_trials(deepcopy=False)
                finished = sum(counts_toward_budget(t) for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if finished >= self.settings.trials:
                    return None
                if finished + running < self.settings.trials:
                    trial = self.study.ask()
                    trial.set_user_attr("worker", osutil.worker_id())
                    if gpu := os.environ.get("CUDA_VISIBLE_DEVICES"):
                        trial.set_user_attr("cuda_visible_devices", gpu)
                    return trial
            time.sleep(min(5.0, coordination.heartbeat_settings()[0]))

    # --- the worker loop ---------------------------------------------------------

    def work(self, data, parent_run_id: str, experiment_id: str) -> None:
        study_file = self.settings.study_file
        failures_in_a_row = 0
        # no trial starts that the budget's plan says cannot end in time
        while not self.settings.out_of_time() and (trial := self._reserve()) is not None:
            # Values are drawn when suggested, by the study's sampler at that moment.
            self.study.sampler = _sampler(self.settings, trial.number)
            values = {p.key: params.rounded(params.suggest(trial, p)) for p in study_file.params}

            def report(step: int, value: float, trial=trial) -> bool:
                trial.report(value, step)
                return trial.should_prune()

            log.info("trial %d: %s", trial.number, console.values(values))
            with coordination.heartbeat(self.storage_url, self.storage, trial):
                outcome = trial_mod.run_trial(
                    study_file, values, data=data, seed=self.settings.seed, engine=self.name,
                    number=trial.number, parent_run_id=parent_run_id, experiment_id=experiment_id,
                    report=report,
                    on_start=lambda run_id, trial=trial: trial.set_user_attr("mlflow_run_id", run_id),
                )
            if outcome.state == trial_mod.COMPLETE:
                self.study.tell(trial, outcome.value)
                failures_in_a_row = 0
            elif outcome.state == trial_mod.PRUNED:
                self.study.tell(trial, state=TrialState.PRUNED)
                failures_in_a_row = 0
            else:
                trial.set_user_attr("fail_reason", outcome.error or "failed")
                self.study.tell(trial, state=TrialState.FAIL)
                failures_in_a_row += 1
                if failures_in_a_row >= study_file.max_consecutive_failures:
                    raise SearchFailed(
                        f"{failures_in_a_row} trials failed in a row (last: {outcome.error}); "
                        "stopping the search"
                    )

    def rows(self) -> list[dict]:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                continue
            rows.append({
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs": len(t.intermediate_values),
                "run_id": t.user_attrs.get("mlflow_run_id"),
                "fail_reason": (t.user_attrs.get("fail_reason", INTERRUPTED)
                                if t.state == TrialState.FAIL else None),
                "retry_of": t.user_attrs.get(RETRY_OF),
                **{f"params.{k}": v for k, v in t.params.items()},
            })
        return rows
