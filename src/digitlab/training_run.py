"""The one tracked-run path: every MLflow run that trains a model goes through
`tracked_run` (`digitlab train`, each experiment of `compare`, each search trial of
either engine).

Open the run, log the setup (a run that fails later keeps it), train through the run's
validation (`train.run` on its split or folds) with per-epoch metrics to MLflow, then
let the caller's `judge` decide how the run ends: what is logged, with or without the
model, and its status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlflow

from digitlab import tracking, train
from digitlab import validation as validation_mod
from digitlab.config import ExperimentConfig
from digitlab.data import DigitData
from digitlab.errors import TrainingFailed
from digitlab.validation import Validation


@dataclass
class Verdict:
    """How a run that trained to its end is recorded."""

    status: str = "FINISHED"  # the MLflow run status
    log_result: bool = True  # final metrics, figures and tables
    log_model: bool = True
    tags: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    failure: train.Failure | None = None
    raise_failure: bool = False  # end the run, then raise TrainingFailed


def plain_verdict(result: train.Result) -> Verdict:
    """A plain run: one that diverged or learnt nothing keeps its curves but no model,
    ends FAILED, and the command says so."""
    failure = result.failure
    if failure is None:
        return Verdict()
    return Verdict(status="FAILED", log_model=False, failure=failure, raise_failure=True,
                   tags={"fail_reason": failure.reason, "error": failure.message[:5000]})


def tracked_run(
    config: ExperimentConfig,
    data: DigitData,
    *,
    name: str | None = None,
    judge: Callable[[train.Result], Verdict] = plain_verdict,
    tags: dict | None = None,
    params: dict | None = None,
    callbacks: Sequence = (),
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    nested: bool = False,
    on_start: Callable[[str], None] | None = None,
    verbose: int | str = "auto",
    validation: Validation | None = None,
) -> tuple[str, train.Result, Verdict]:
    """Train `config` on `data` as one MLflow run; returns its id, the result and verdict.

    `on_start(run_id)` runs once the run exists (an engine records the id); an exception
    from training ends the run FAILED and propagates. `validation` is how the run is
    validated and trains (`digitlab.validation`): the config's own split unless given (a
    K-fold trial's folds, a refit's nothing held out); it records what it held out and
    logs the models the run hands on.
    """
    validation = validation or validation_mod.default()
    with tracking.open_run(name or config.name, nested=nested, tags=tags,
                           parent_run_id=parent_run_id, experiment_id=experiment_id,
                           system_metrics=tracking.system_metrics_enabled()) as handle:
        if on_start:
            on_start(handle.run_id)
        tracking.log_setup(config, data, validation)
        if params:
            mlflow.log_params(params)
        result = validation.fit(config, data, callbacks=list(callbacks),
                                on_epoch=tracking.epoch_logger(handle.run_id), verbose=verbose,
                                label=name or config.name)
        verdict = judge(result)
        if verdict.log_result:
            tracking.log_result(result)
        if verdict.log_model:
            validation.log_models(result)
        if verdict.metrics:
            mlflow.log_metrics(verdict.metrics)
        if verdict.tags:
            mlflow.set_tags(verdict.tags)
        handle.status = verdict.status
    if verdict.failure is not None and verdict.raise_failure:
        raise TrainingFailed(f"{config.name}: {verdict.failure.message}; run {handle.run_id} "
                             "ended FAILED, without a model", verdict.failure.reason)
    return handle.run_id, result, verdict
