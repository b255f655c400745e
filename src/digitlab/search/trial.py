"""One trial, whatever the engine: sampled values -> config overrides -> `tracked_run`,
recorded as one MLflow run nested under the search's parent run and validated the
study's validation (`digitlab.validation`: one split, or K folds scored out of fold).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from digitlab import console, train
from digitlab.data import DigitData
from digitlab.search.params import decode
from digitlab.search.search_file import StudyFile
from digitlab.training_run import Verdict, tracked_run

log = logging.getLogger("digitlab.search")

COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"
# How each trial state ends its MLflow run: a pruned trial was stopped early, so it is
# KILLED in the run list (tag trial_state says why), never an ordinary FINISHED run.
RUN_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED", FAIL: "FAILED"}


@dataclass
class Outcome:
    state: str
    value: float | None  # the objective; None unless the trial reported a finite one
    run_id: str
    epochs: int
    error: str | None = None


def objective_value(study_file: StudyFile, result: train.Result) -> float | None:
    """The score of the model the trial hands on, not of its best epoch: a trial that kept
    its last weights is ranked by them, or the search would rank weights nobody registers.
    Validation accuracy and cross-entropy are measured on that model itself, so they are
    right whichever weights were restored; the other metrics are the last epoch's."""
    if study_file.objective.metric in ("val_accuracy", "val_crossentropy"):
        value = getattr(result, study_file.objective.metric)
    else:
        value = (result.history.get(study_file.objective.metric) or [math.nan])[-1]
    return value if math.isfinite(value) else None


def failed(message: str, reason: str, log_result: bool = True) -> Verdict:
    # No model, so that nothing can register it; the curves show what went wrong.
    return Verdict(status=RUN_STATUS[FAIL], log_result=log_result, log_model=False,
                   tags={"trial_state": FAIL, "error": message[:5000],
                         "fail_reason": reason[:250]})  # filter by tags.fail_reason


def judge(study_file: StudyFile, hook, validation) -> Callable[[train.Result], Verdict]:
    def verdict(result: train.Result) -> Verdict:
        pruned = hook is not None and hook.pruned_at is not None
        failure = result.failure
        # A pruned trial is never ranked, and after its few epochs it may fairly still be
        # near chance; its reported values are what the pruner learns from, so only a
        # diverged one fails.
        if failure is not None and not (pruned and failure.reason != train.DIVERGED):
            return failed(failure.message, failure.reason)
        value = objective_value(study_file, result)
        if value is None:
            reason = f"no finite {study_file.objective.metric}"
            return failed(reason, reason, log_result=False)
        state = PRUNED if pruned else COMPLETE
        metrics = {"objective": value}
        if state == COMPLETE:
            metrics.update(validation.scores(result))
        return Verdict(status=RUN_STATUS[state], log_model=not pruned,
                       tags={"trial_state": state}, metrics=metrics)

    return verdict


def run_trial(
    study_file: StudyFile,
    values: dict[str, Any],
    *,
    data: DigitData,
    seed: int,
    engine: str,
    number: int,
    parent_run_id: str,
    experiment_id: str,
    epochs: int | None = None,
    report: Callable[[int, float], bool] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> Outcome:
    from digitlab.callbacks import PruningHook

    values = {k: decode(v) for k, v in values.items()}
    config = study_file.trial_config(values, seed, number, epochs)
    hook = PruningHook(study_file.objective.metric, report) if report else None
    validation = study_file.validator
    tags = {"trial_number": number, "engine": engine, "trial_state": "RUNNING"}
    started: list[str] = []

    def start(run_id: str) -> None:
        started.append(run_id)
        if on_start:
            on_start(run_id)

    try:
        run_id, result, verdict = tracked_run(
            config, data, name=f"trial-{number}", judge=judge(study_file, hook, validation), tags=tags,
            params={f"sampled.{k}": json.dumps(v) if isinstance(v, list) else v
                    for k, v in values.items()},
            callbacks=[hook] if hook else [], parent_run_id=parent_run_id,
            experiment_id=experiment_id, on_start=start, verbose=2 if console.verbose() else 0,
            validation=validation,
        )
        outcome = Outcome(verdict.tags["trial_state"], verdict.metrics.get("objective"), run_id,
                          result.epochs_trained, verdict.tags.get("error"))
    except Exception as exc:  # the search goes on; this trial alone fails
        if not started:
            raise  # no run was opened: not the trial's fault
        error = f"{type(exc).__name__}: {exc}"
        client = MlflowClient()
        for key, value in failed(error, type(exc).__name__).tags.items():
            client.set_tag(started[0], key, value)
        outcome = Outcome(FAIL, None, started[0], 0, error)
    log_outcome(study_file.scored_by, number, outcome)
    return outcome


def log_outcome(metric: str, number: int | str, outcome: Outcome) -> None:
    """One line per finished trial (the progress bar shows the count and the best)."""
    value = f" {metric} {outcome.value:.4f}" if outcome.value is not None else ""
    reason = f": {outcome.error}" if outcome.error else ""
    log.info("trial %s %s after %d epoch%s%s%s", number, outcome.state, outcome.epochs,
             "" if outcome.epochs == 1 else "s", value, reason)
