"""One trial, whatever the engine: sampled values -> config overrides -> `train.run`,
recorded as one MLflow run nested under the search's parent run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import mlflow

from digitlab import tracking, train
from digitlab.data import DigitData
from digitlab.search.space import SearchSpace

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


class PruningHook(keras.callbacks.Callback):
    """Reports the objective after every epoch; stops training when the engine says prune."""

    def __init__(self, metric: str, report: Callable[[int, float], bool]) -> None:
        super().__init__()
        self.metric = metric
        self.report = report
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        if self.report(epoch + 1, float(value)):
            self.pruned_at = epoch + 1
            self.model.stop_training = True


def objective_value(space: SearchSpace, result: train.Result) -> float | None:
    """The score of the model the trial hands on, not of its best epoch: a trial that kept
    its last weights is ranked by them, or the search would rank weights nobody registers.
    Validation accuracy and cross-entropy are measured on that model itself, so they are
    right whichever weights were restored; the other metrics are the last epoch's."""
    if space.metric in ("val_accuracy", "val_crossentropy"):
        value = getattr(result, space.metric)
    else:
        value = (result.history.get(space.metric) or [math.nan])[-1]
    return value if math.isfinite(value) else None


def encode(value: Any) -> Any:
    """Engines accept only scalars as choices: lists (e.g. dense_units) travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def run_trial(
    space: SearchSpace,
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
    verbose: int | str = 2,
) -> Outcome:
    values = {k: decode(v) for k, v in values.items()}
    config = space.trial_config(values, seed, number, epochs)
    tags = {"trial_number": number, "engine": engine, "trial_state": "RUNNING"}
    with tracking.run(f"trial-{number}", tags=tags, parent_run_id=parent_run_id,
                      experiment_id=experiment_id) as handle:
        if on_start:
            on_start(handle.run_id)
        tracking.log_setup(config, data)
        mlflow.log_params({f"sampled.{k}": json.dumps(v) if isinstance(v, list) else v
                           for k, v in values.items()})
        hook = PruningHook(space.metric, report) if report else None
        callbacks = [tracking.EpochLogger(handle.run_id)] + ([hook] if hook else [])
        try:
            result = train.run(config, data, callbacks=callbacks, verbose=verbose)
        except Exception as exc:  # the search goes on; this trial alone fails
            return _end(handle, FAIL, None, 0, f"{type(exc).__name__}: {exc}",
                        reason=type(exc).__name__)
        pruned = hook is not None and hook.pruned_at is not None
        failure = result.failure
        # A pruned trial is never ranked, and after its few epochs it may fairly still be
        # near chance; its reported values are what the pruner learns from, so only a
        # diverged one fails.
        if failure is not None and not (pruned and failure.reason != train.DIVERGED):
            # Curves and confusion matrix show what went wrong; no model, so that nothing
            # can register it.
            tracking.log_result(result, with_model=False)
            return _end(handle, FAIL, None, result.epochs_trained, failure.message,
                        reason=failure.reason)
        value = objective_value(space, result)
        if value is None:
            return _end(handle, FAIL, None, result.epochs_trained, f"no finite {space.metric}",
                        reason=f"no finite {space.metric}")
        tracking.log_result(result, with_model=not pruned)
        mlflow.log_metric("objective", value)
        state = PRUNED if pruned else COMPLETE
        return _end(handle, state, value, result.epochs_trained)


def _end(handle, state: str, value, epochs: int, error: str | None = None,
         reason: str | None = None) -> Outcome:
    mlflow.set_tag("trial_state", state)
    if error:
        mlflow.set_tag("error", error[:5000])
        # The short tag to filter failed trials by (tags.fail_reason = 'diverged').
        mlflow.set_tag("fail_reason", (reason or "error")[:250])
        print(f"trial failed: {error}", flush=True)
    handle.status = RUN_STATUS[state]
    return Outcome(state, value, handle.run_id, epochs, error)


def log_outcome(metric: str, number: int | str, outcome: Outcome) -> None:
    """One line per finished trial (the progress bar shows the count and the best)."""
    value = f" {metric} {outcome.value:.4f}" if outcome.value is not None else ""
    reason = f": {outcome.error}" if outcome.error else ""
    logging.getLogger("digitlab.search").info(
        "trial %s %s after %d epoch%s%s%s", number, outcome.state, outcome.epochs,
        "" if outcome.epochs == 1 else "s", value, reason)
