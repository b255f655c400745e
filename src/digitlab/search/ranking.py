"""The one ranking of a search's trials, best first: what the progress bar, the search's
summary, promote and the benchmarks all use, and which search is the latest. It lives with
the search, which defines the objective; the registry imports it."""

from __future__ import annotations

import math

from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab.errors import UserError


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
