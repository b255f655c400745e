"""The study's parent run, its whole life in one place: opened (under `mlflow run`, that
run), reopened when the study resumes, the trial runs whose process died ended KILLED, the
summary written when the trials end (trials table, plots, best trial, description), and
the command that reproduces the study. What the summary says is rendered by `report`.
"""

from __future__ import annotations

import collections
import math
import os

import optuna
import pandas as pd
from mlflow import MlflowClient

from digitlab import console, store
from digitlab.search import ranking, report
from digitlab.search import trial as trial_mod
from digitlab.search.coordination import redact
from digitlab.search.settings import Settings


def open_or_resume(settings: Settings, stored_run_id: str | None) -> tuple[str, str]:
    """Reopen the study's parent run, or create one (the `mlflow run` run, if any)."""
    client = MlflowClient()
    if stored_run_id:
        if launched := os.environ.pop("MLFLOW_RUN_ID", None):
            client.set_tag(launched, "resumed_search_run_id", stored_run_id)
        client.update_run(stored_run_id, status="RUNNING")
        return stored_run_id, client.get_run(stored_run_id).info.experiment_id
    # Under `mlflow run` its run becomes the parent. Taken out of the environment so
    # that trials (and worker processes) start runs of their own instead of resuming it.
    if run_id := os.environ.pop("MLFLOW_RUN_ID", None):
        client.set_tag(run_id, "mlflow.runName", settings.study)
        experiment_id = client.get_run(run_id).info.experiment_id
    else:
        experiment_id = store.experiment_id()
        run_id = client.create_run(experiment_id, run_name=settings.study).info.run_id
    study_file = settings.study_file
    # `mlflow run` has already logged its -P parameters (with their raw values) here
    already = client.get_run(run_id).data.params
    for key, value in {
        "space": settings.space or study_file.name, "engine": settings.engine, "study": settings.study,
        "experiments": ",".join(study_file.experiments), "objective.metric": study_file.objective.metric,
        "objective.direction": study_file.objective.direction, "budget.trials": settings.trials,
        "budget.max_epochs": settings.max_epochs,
        "budget.minutes": study_file.budget.minutes or "none",
        "budget.search_minutes": study_file.budget.search_minutes or "none",
        "final.models": study_file.final.models, "final.passes": study_file.final.passes,
        "seed": settings.seed,
        "storage": redact(settings.storage) if settings.storage else "default",
        "workers": settings.workers,
        "optuna.sampler": study_file.optuna.sampler, "optuna.pruner": study_file.optuna.pruner,
        "kerastuner.tuner": study_file.kerastuner.tuner,
    }.items():
        if key not in already:
            client.log_param(run_id, key, str(value))
    client.set_tag(run_id, "engine", settings.engine)
    client.set_tag(run_id, "search_study", settings.study)
    client.set_tag(run_id, "reproduce", reproduce_command(settings))
    client.set_tag(run_id, "mlflow.source.name", "digitlab search")
    client.set_tag(run_id, "mlflow.note.content", report.describe(settings, reproduce_command(settings)))
    client.log_artifact(run_id, study_file.path)
    return run_id, experiment_id


def point_to(parent_run_id: str | None) -> None:
    """Under `mlflow run`, a study that has nothing left to do still has the run MLflow
    opened for the command: say in it where the study's results are."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched or not parent_run_id or launched == parent_run_id:
        return
    client = MlflowClient()
    client.set_tag(launched, "resumed_search_run_id", parent_run_id)
    client.set_tag(launched, "mlflow.note.content",
                   f"The study was already finished: its results are in run {parent_run_id}.")


def reproduce_command(settings: Settings) -> str:
    """The command that runs this study again (or resumes it: the same study name)."""
    import shlex

    study_file = settings.study_file
    # as the user typed them, so that the command runs on another machine too
    words = ["digitlab", "search", "--space", settings.space or study_file.name, "--engine", settings.engine,
             "--trials", str(settings.trials), "--max-epochs", str(settings.max_epochs)]
    if study_file.budget.minutes:
        words += ["--minutes", f"{study_file.budget.minutes:g}"]
    words += settings.validation.command_options()
    words += ["--seed", str(settings.seed), "--study", settings.study]
    if settings.storage:  # a password in it stays out of the store: anyone may read runs
        words += ["--storage", redact(settings.storage)]
    if settings.workers > 1:
        words += ["--workers", str(settings.workers)]
    if settings.data_dir:
        words += ["--data-dir", str(settings.data_dir)]
    return shlex.join(words)


def end_trial_run_killed(run_id: str) -> None:
    """A trial whose process died: its run ends KILLED and its state FAIL."""
    client = MlflowClient()
    client.set_tag(run_id, "trial_state", trial_mod.FAIL)
    client.set_tag(run_id, "error", "interrupted: the process running this trial died")
    client.set_terminated(run_id, "KILLED")


def failure_reasons(rows: list[dict]) -> dict[str, int]:
    """Failed trials by their runs' short `fail_reason` tag (for `report.nothing_completed`)."""
    client = MlflowClient()
    reasons: collections.Counter = collections.Counter()
    for row in rows:
        if row["state"] == "FAIL":
            tags = client.get_run(row["run_id"]).data.tags if row.get("run_id") else {}
            reasons[tags.get("fail_reason") or row.get("fail_reason") or "no reason recorded"] += 1
    return dict(reasons)


def finish(settings: Settings, parent_run_id: str, rows: list[dict], status: str = "FINISHED") -> dict:
    """Log the trials table, the plots and the best trial to the parent run; end it."""
    client = MlflowClient()
    study_file = settings.study_file
    table = pd.DataFrame(rows).sort_values("number") if rows else pd.DataFrame()
    if not table.empty:
        client.log_text(parent_run_id, table.to_csv(index=False), "trials.csv")
    study = report.replay(settings, rows)
    if any(t.value is not None and math.isfinite(t.value) for t in study.trials):
        _log_plots(client, parent_run_id, study)
    # The registry's ranking (with its tie-break) names the best trial, so the search
    # reports the trial that `digitlab promote` would register.
    done = {r["run_id"]: r for r in rows if r["state"] == "COMPLETE" and r.get("run_id")}
    ranked = ranking.ranked_trials(client, client.get_run(parent_run_id))
    best = next((done[t.info.run_id] for t in ranked if t.info.run_id in done), None)
    if best:
        client.log_metric(parent_run_id, f"best_{study_file.objective.metric}", float(best["value"]))
        client.log_metric(parent_run_id, "best_value", float(best["value"]))
        client.set_tag(parent_run_id, "best_trial_number", str(best["number"]))
        for key, value in best.items():
            if key.startswith("params.") and value is not None:
                client.set_tag(parent_run_id, f"best.{key.removeprefix('params.')}",
                               console.number(value))
        client.set_tag(parent_run_id, "mlflow.note.content",
                       report.describe(settings, reproduce_command(settings), best))
        if best.get("run_id"):
            client.set_tag(parent_run_id, "best_run_id", best["run_id"])
    states = pd.Series([r["state"] for r in rows]).value_counts().to_dict() if rows else {}
    for state, count in states.items():
        client.log_metric(parent_run_id, f"trials_{state.lower()}", count)
    client.set_terminated(parent_run_id, status)
    return {"best": best, "states": states}


def _log_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    import matplotlib.pyplot as plt

    if html := report.interactive_html(study):
        client.log_text(run_id, html, "plots/search.html")
    for path, figure in report.figures(study).items():
        if isinstance(figure, str):
            client.log_text(run_id, figure, path)
        else:
            client.log_figure(run_id, figure, path)
            plt.close(figure)
