"""Which runs a promotion takes: the top trials of a search (ranked by
`search.ranking`, the one ranking), or one named run."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab.errors import UserError, one_line
from digitlab.search.ranking import latest_search_run, ranked_trials


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


def final_models(client: MlflowClient, search_run: Run) -> tuple[list[Run], list[float]]:
    """The final models the search trained (`search.final`) and their weights; ([], []) when
    it trained none. A final stage that did not end is one line: it is finished by running
    the same search command again, not skipped by promoting a trial in its place."""
    from digitlab.search import final

    if final.pending(search_run):
        raise UserError(f"search run {search_run.info.run_id} has not finished its final training: "
                        "run the same digitlab search command again to finish it (or promote a "
                        "trial with --ensemble 1)")
    return [client.get_run(i) for i in final.run_ids(search_run)], final.weights(search_run)
