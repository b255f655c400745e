"""The search's report, rendered from what it is given: the parent run's description, the
line that says why nothing completed, and the plots.

Plots for both engines come from one place: the trials, whatever engine ran them, are
replayed into an in-memory Optuna study, and Optuna's plots draw the optimisation
history, parameter importances and parallel coordinates from it. The parent run itself
(opening, resuming, writing the summary) is `parent_run`.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from digitlab import console
from digitlab.errors import one_line
from digitlab.search import params
from digitlab.search.search_file import Param
from digitlab.search.settings import Settings


def _range(p: Param) -> str:
    if p.kind == "categorical":
        return f"{p.key} in {{{', '.join(map(str, p.choices))}}}"
    return f"{p.key} {p.kind} {p.low:g}-{p.high:g}" + (" (log)" if p.log else "")


def describe(settings: Settings, reproduce: str, best: dict | None = None) -> str:
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
             f"- reproduce: `{reproduce}`"]
    if best:
        values = console.values({k.removeprefix("params."): v for k, v in best.items()
                                 if k.startswith("params.") and v is not None})
        lines.append(f"- best: trial {best['number']}, {study_file.objective.metric} "
                     f"{best['value']:.4f} ({values})")
    return "\n".join(lines)


def nothing_completed(rows: list[dict], reasons: dict[str, int]) -> str:
    """Why a study has no completed trial, in one line: how its trials ended, and the most
    common reason a trial failed (`reasons`: failed trials by their `fail_reason`)."""
    import collections

    states = collections.Counter(r["state"] for r in rows)
    ended = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trial ran"
    line = f"no trial completed ({ended})"
    if reasons:
        reason, count = collections.Counter(reasons).most_common(1)[0]
        line += f"; most failed trials: {one_line(reason)} ({count} of {states['FAIL']})"
    return line + "; nothing to promote"


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


def figures(study: optuna.Study) -> dict[str, object]:
    """Optuna's matplotlib plots of the study, by artifact path; a plot that cannot be drawn
    (importances need two trials with differing parameters) is the text saying why."""
    import warnings

    from optuna.visualization import matplotlib as ovm

    plots = {
        "plots/optimization_history.png": ovm.plot_optimization_history,
        "plots/param_importances.png": ovm.plot_param_importances,
        "plots/parallel_coordinate.png": ovm.plot_parallel_coordinate,
    }
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for path, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                out[path.replace(".png", ".txt")] = f"not drawn: {exc}\n"
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            out[path] = figure
    return out


def interactive_html(study: optuna.Study) -> str | None:
    """Optuna's plotly figures in one HTML page that the MLflow artifact viewer renders.

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
    if not parts:
        return None
    return "<html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>"
