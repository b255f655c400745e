"""Where runs go: the tracking store, the experiment, and the UI's address.

`MLFLOW_TRACKING_URI` if set, else `sqlite:///mlflow.db` in the working directory (never a
./mlruns file store); the experiment `digit-recognizer` unless MLflow's own variables or
`mlflow run --experiment-name` choose another.
"""

from __future__ import annotations

import os

import mlflow

from digitlab import osutil
from digitlab.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "digit-recognizer"
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's own "Default" experiment
LOGGED_IN_TAG = "digitlab.logged_in"  # on an `mlflow run` run left in Default: where we logged


def configure() -> str:
    """Point MLflow at the store and experiment; returns the tracking URI.

    Artifacts go where MLflow puts them for the store: with the SQLite default,
    files under ./mlruns/ beside mlflow.db, the same whether `digitlab` or
    `mlflow run` created the experiment.

    Under `mlflow run` (MLFLOW_RUN_ID set) the run and its experiment are already
    chosen, and we log into them, unless MLflow chose its Default experiment for want of
    a name: then `digit-recognizer`, as without `mlflow run`. Otherwise MLflow's own order: the experiment named
    in MLFLOW_EXPERIMENT_NAME, else the one whose id is in MLFLOW_EXPERIMENT_ID, else
    `digit-recognizer`.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if launched := os.environ.get("MLFLOW_RUN_ID"):
        if not _launched_in_default(launched):
            mark_model_training(experiment_id())
            return uri
        _leave_default(launched)
    if chosen_id := _chosen_experiment_id():
        try:
            mlflow.set_experiment(experiment_id=chosen_id)
        except mlflow.exceptions.MlflowException as exc:  # unknown, malformed or deleted
            raise UserError(f"MLFLOW_EXPERIMENT_ID={chosen_id}: {exc.message}") from None
        mark_model_training(chosen_id)
        return uri
    name = experiment_name()
    # set_experiment also exports the id in MLFLOW_EXPERIMENT_ID; put back what was there,
    # or a later `configure` in this process (for another store, say) or a subprocess would
    # take the id for the user's choice.
    with osutil.environ(MLFLOW_EXPERIMENT_ID=os.environ.get("MLFLOW_EXPERIMENT_ID")):
        try:
            mlflow.set_experiment(name)
        except mlflow.exceptions.MlflowException:
            mlflow.set_experiment(name)  # a parallel process created it first
    mark_model_training(experiment_id())
    return uri


def _launched_in_default(run_id: str) -> bool:
    """`mlflow run` without --experiment-name or MLFLOW_EXPERIMENT_NAME puts its run in
    MLflow's Default experiment (id 0), which nobody chose."""
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return False
    return mlflow.MlflowClient().get_run(run_id).info.experiment_id == DEFAULT_EXPERIMENT_ID


def _leave_default(run_id: str) -> None:
    """Log into `digit-recognizer` instead, where `digitlab ui` and promote look, and say so
    in the `mlflow run` run, which stays in Default: MLflow cannot move a run, and it ends
    that run itself when the command exits."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(name, None)
    client = mlflow.MlflowClient()
    client.set_tag(run_id, LOGGED_IN_TAG, DEFAULT_EXPERIMENT)
    client.set_tag(run_id, "mlflow.note.content",
                   f"digitlab logged this command's runs in the experiment {DEFAULT_EXPERIMENT!r}: "
                   "`mlflow run --experiment-name NAME` chooses another.")


# The MLflow 3 UI opens an experiment as a GenAI one (traces, evaluation runs) unless its
# kind tag says model training; then it lands on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training(experiment: str | None) -> None:
    if not experiment:
        return
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG in client.get_experiment(experiment).tags:
        return
    try:
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except mlflow.exceptions.MlflowException:
        # Workers starting together race to tag the new experiment, and MLflow's SQL store
        # inserts the tag without an upsert: the loser's insert fails on the primary key.
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment).tags:
            raise


def ui_url(host: str, port: int, experiment: str) -> str:
    """The experiment's training-runs page; `workflowType` overrides a browser that last
    showed the GenAI view (the UI keeps that choice in its local storage)."""
    return f"http://{host}:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def _chosen_experiment_id() -> str | None:
    """The id in MLFLOW_EXPERIMENT_ID, unless MLFLOW_EXPERIMENT_NAME (which wins) is set."""
    return None if os.environ.get("MLFLOW_EXPERIMENT_NAME") else os.environ.get("MLFLOW_EXPERIMENT_ID")


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_id() -> str | None:
    """The experiment this command works in, None when it does not exist yet: `mlflow run`'s,
    else chosen in the order that `configure` follows."""
    if os.environ.get("MLFLOW_RUN_ID") and (launched := os.environ.get("MLFLOW_EXPERIMENT_ID")):
        return launched
    if chosen_id := _chosen_experiment_id():
        return chosen_id
    experiment = mlflow.get_experiment_by_name(experiment_name())
    return experiment.experiment_id if experiment else None


def check_server(uri: str) -> None:
    """Fail fast, with a clear message, when the tracking server cannot be reached."""
    import requests

    # MLflow itself retries a dead server for minutes; after this check a few tries suffice.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the MLflow tracking server at {uri}: "
                        f"{type(exc).__name__}") from None
