"""The search's parent run: opened (or reopened) before the trials, summarised after.

Plots for both engines come from one place: the trials, whatever engine ran
them, are replayed into an in-memory Optuna study, and Optuna's matplotlib
plots draw the optimisation history, parameter importances and parallel
coordinates from it.
"""

from __future__ import annotations

import math
import os

import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import TrialState

from digitlab import console, store
from digitlab.errors import one_line
from digitlab.search import params, ranking
from digitlab.search import trial as trial_mod
from digitlab.search.coordination import redact
from digitlab.search.settings import Settings
from digitlab.search.space import Param


def open_parent(settings: Settings, stored_run_id: str | None) -> tuple[str, str]:
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
    client.set_tag(run_id, "mlflow.note.content", describe(settings))
    client.log_artifact(run_id, study_file.path)
    return run_id, experiment_id


def point_to_parent(parent_run_id: str | None) -> None:
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
    words += settings.validation.options()
    words += ["--seed", str(settings.seed), "--study", settings.study]
    if settings.storage:  # a password in it stays out of the store: anyone may read runs
        words += ["--storage", redact(settings.storage)]
    if settings.workers > 1:
        words += ["--workers", str(settings.workers)]
    if settings.data_dir:
        words += ["--data-dir", str(settings.data_dir)]
    return shlex.join(words)


def _range(p: Param) -> str:
    if p.kind == "categorical":
        return f"{p.key} in {{{', '.join(map(str, p.choices))}}}"
    return f"{p.key} {p.kind} {p.low:g}-{p.high:g}" + (" (log)" if p.log else "")


def describe(settings: Settings, best: dict | None = None) -> str:
    """The parent run's description (Markdown): what the study searches, how, and its best."""
    study_file = settings.study_file
    engine = (f"Optuna, {study_file.optuna.sampler} sampler, {study_file.optuna.pruner} pruner"
              if settings.engine == "optuna" else f"KerasTuner, {study_file.kerastuner.tuner} tuner")
    budget = f"{settings.trials} trials of up to {settings.max_epochs} epochs"
    if study_file.budget.minutes:
        budget += f", {study_file.budget.minutes:g} minutes in all with final training"
    elif study_file.budget.search_minutes:
        budget += f", {study_file.budget.search_minutes:g} minutes of trials"
    if study_file.final.models:
        budget += (f"; then final training on every labelled image ({study_file.final.models} "
                   f"models of {study_file.final.passes:g} passes unless --minutes says otherwise)")
    lines = [f"**{settings.study}**" + (f": {study_file.description}" if study_file.description else ""),
             "",
             f"- experiments: {', '.join(study_file.experiments)}",
             f"- objective: {study_file.objective.direction} {study_file.objective.metric}"
             + settings.validation.describe(),
             f"- engine: {engine}",
             f"- budget: {budget}",
             f"- space: {'; '.join(_range(p) for p in study_file.params)}",
             f"- reproduce: `{reproduce_command(settings)}`"]
    if best:
        values = console.values({k.removeprefix("params."): v for k, v in best.items()
                                 if k.startswith("params.") and v is not None})
        lines.append(f"- best: trial {best['number']}, {study_file.objective.metric} "
                     f"{best['value']:.4f} ({values})")
    return "\n".join(lines)


def nothing_completed(rows: list[dict]) -> str:
    """Why a study has no completed trial, in one line: how its trials ended, and the most
    common reason a trial failed (the runs' short `fail_reason` tag)."""
    import collections

    client = MlflowClient()
    states = collections.Counter(r["state"] for r in rows)
    reasons = collections.Counter()
    for row in rows:
        if row["state"] == "FAIL":
            tags = client.get_run(row["run_id"]).data.tags if row.get("run_id") else {}
            reasons[tags.get("fail_reason") or row.get("fail_reason") or "no reason recorded"] += 1
    ended = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trial ran"
    line = f"no trial completed ({ended})"
    if reasons:
        reason, count = reasons.most_common(1)[0]
        line += f"; most failed trials: {one_line(reason)} ({count} of {states['FAIL']})"
    return line + "; nothing to promote"


def end_trial_run_killed(run_id: str) -> None:
    """A trial whose process died: its run ends KILLED and its state FAIL."""
    client = MlflowClient()
    client.set_tag(run_id, "trial_state", trial_mod.FAIL)
    client.set_tag(run_id, "error", "interrupted: the process running this trial died")
    client.set_terminated(run_id, "KILLED")


def replay(settings: Settings, rows: list[dict]) -> optuna.Study:
    """The trials as an in-memory Optuna study (for plots and importances).

    Every trial is added, pruned and failed ones too, so that the plots number trials
    as the MLflow runs and the trials table do; only completed trials carry a value.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=settings.study_file.objective.direction)
    distributions = {p.key: params.optuna_distribution(p) for p in settings.study_file.params}
    states = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}
    for row in sorted(rows, key=lambda r: r["number"]):
        # A number without a row (e.g. a trial still queued) keeps its place as a FAIL.
        while len(study.get_trials(deepcopy=False)) < row["number"]:
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
        state = states.get(row["state"], TrialState.FAIL)
        if state == TrialState.COMPLETE and row["value"] is None:
            state = TrialState.FAIL
        sampled = {k: row[f"params.{k}"] for k in distributions if row.get(f"params.{k}") is not None}
        study.add_trial(optuna.trial.create_trial(
            params=sampled, distributions={k: distributions[k] for k in sampled}, state=state,
            value=row["value"] if state == TrialState.COMPLETE else None,
        ))
    return study


def finish(settings: Settings, parent_run_id: str, rows: list[dict], status: str = "FINISHED") -> dict:
    """Log the trials table, the plots and the best trial to the parent run; end it."""
    client = MlflowClient()
    study_file = settings.study_file
    table = pd.DataFrame(rows).sort_values("number") if rows else pd.DataFrame()
    if not table.empty:
        client.log_text(parent_run_id, table.to_csv(index=False), "trials.csv")
    study = replay(settings, rows)
    if any(t.value is not None and math.isfinite(t.value) for t in study.trials):
        _plots(client, parent_run_id, study)
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
        client.set_tag(parent_run_id, "mlflow.note.content", describe(settings, best))
        if best.get("run_id"):
            client.set_tag(parent_run_id, "best_run_id", best["run_id"])
    states = pd.Series([r["state"] for r in rows]).value_counts().to_dict() if rows else {}
    for state, count in states.items():
        client.log_metric(parent_run_id, f"trials_{state.lower()}", count)
    client.set_terminated(parent_run_id, status)
    return {"best": best, "states": states}


def _plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    _interactive_plots(client, run_id, study)
    plots = {
        "plots/optimization_history.png": ovm.plot_optimization_history,
        "plots/param_importances.png": ovm.plot_param_importances,
        "plots/parallel_coordinate.png": ovm.plot_parallel_coordinate,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for path, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                # importances need two trials with differing parameters
                client.log_text(run_id, f"not drawn: {exc}\n", path.replace(".png", ".txt"))
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            client.log_figure(run_id, figure, path)
            plt.close(figure)


def _interactive_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Optuna's plotly figures in one HTML artifact that the MLflow artifact viewer renders.

    plotly.js is embedded once (no CDN: the UI may have no network), the figures follow."""
    from optuna import visualization as ov

    parts = []
    for plot in (ov.plot_optimization_history, ov.plot_param_importances,
                 ov.plot_parallel_coordinate, ov.plot_slice):
        try:
            figure = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances need two trials with differing parameters
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not parts))
    if parts:
        client.log_text(run_id, "<html><head><meta charset='utf-8'></head><body>"
                        + "".join(parts) + "</body></html>", "plots/search.html")
