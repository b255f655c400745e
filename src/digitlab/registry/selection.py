"""Which runs a promotion takes: the latest search, its trials ranked (the one ranking that
the progress bar, the search's summary and promote all use), or one named run."""

from __future__ import annotations

import math

from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab.errors import UserError, one_line


def latest_search_run(client: MlflowClient, experiment_ids: list[str]) -> Run:
    from digitlab import store

    def latest(ids: list[str]) -> Run | None:
        runs = client.search_runs(ids, filter_string="tags.search_study LIKE '%'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    if found := latest(experiment_ids):
        return found
    here = ", ".join(repr(client.get_experiment(i).name) for i in experiment_ids) or \
        repr(store.experiment_name())
    elsewhere = latest([e.experiment_id for e in client.search_experiments()])
    hint = (f"; the latest search is run {elsewhere.info.run_id} in experiment "
            f"{client.get_experiment(elsewhere.info.experiment_id).name!r}: pass --search-run "
            f"{elsewhere.info.run_id}" if elsewhere else "; run `digitlab search` first")
    raise UserError(f"no search run found in experiment {here}{hint}")


def ranked_trials(client: MlflowClient, search_run: Run) -> list[Run]:
    """The search's completed trials, best objective first.

    Validation accuracy moves in steps of one image (0.25 points on the embedded data's
    400), so the top trials often tie: the lower validation cross-entropy of the model the
    trial kept breaks the tie (not val_loss, which adds each trial's own L2 penalty), the
    run id after that. Runs logged before that metric existed fall back to the last epoch's.
    """
    direction = search_run.data.params.get("objective.direction", "maximize")
    trials = client.search_runs(
        [search_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{search_run.info.run_id}' "
                      "and tags.trial_state = 'COMPLETE'",
        max_results=5000,
    )
    trials = [t for t in trials if "objective" in t.data.metrics]
    sign = -1 if direction == "maximize" else 1

    def crossentropy(t: Run) -> float:
        m = t.data.metrics
        return m.get("val_crossentropy_final_model", m.get("val_crossentropy", math.inf))

    return sorted(trials, key=lambda t: (sign * t.data.metrics["objective"], crossentropy(t), t.info.run_id))


def get_run(client: MlflowClient, run_id: str, option: str) -> Run:
    """The run `run_id` names, or a one-line error that names it and the store."""
    import mlflow

    from digitlab.search.coordination import redact

    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"{option} {run_id}: no such run in the tracking store "
                        f"{redact(mlflow.get_tracking_uri())}") from None


def select(client: MlflowClient, experiment_ids: list[str], search_run_id: str | None,
           run_id: str | None, ensemble: int) -> tuple[list[Run], Run | None]:
    """The member runs of the candidate (one, or the top K of a search) and their search."""
    if run_id:
        run = get_run(client, run_id, "--run")
        tags = run.data.tags
        if run.info.status == "FAILED" or tags.get("trial_state") == "FAIL":
            why = one_line(tags.get("error") or tags.get("fail_reason") or "no reason recorded")
            raise UserError(f"run {run_id} failed ({why}); a failed run is never promoted")
        parent_id = tags.get("mlflow.parentRunId")
        return [run], client.get_run(parent_id) if parent_id else None
    search_run = (get_run(client, search_run_id, "--search-run") if search_run_id
                  else latest_search_run(client, experiment_ids))
    trials = ranked_trials(client, search_run)
    if not trials:
        raise UserError(f"search run {search_run.info.run_id} has no completed trial to promote")
    if ensemble > len(trials):
        plural = "" if len(trials) == 1 else "s"
        raise UserError(f"--ensemble {ensemble}: the search has only {len(trials)} completed trial{plural}")
    return trials[: max(1, ensemble)], search_run
