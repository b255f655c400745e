"""Refit: a chosen trial's configuration trained again on every labelled image, training
and validation images together, for the length the search found best.

A search holds back validation images to choose; once it has chosen, they are worth more
as training data. The refit is its own MLflow run nested under the trial it came from
(tags `refit_of`, `trial_number`), trained through the one tracked-run path and logged like
any other run; `digitlab promote --refit` registers it through the same gate, load check
and aliases. A finished refit of the same trial on the same data is reused, so a promote
that was interrupted, or run again, does not train it twice.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import config as config_mod
from digitlab import osutil
from digitlab.data import DigitData
from digitlab.errors import ConfigError, UserError, one_line

log = logging.getLogger(__name__)

KIND = "refit"


def rebuild(run: Run):
    """The run's own configuration (its config.yaml artifact) as trained, checked, with
    nothing run yet: a run whose configuration cannot be rebuilt is one line, exit 2."""
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                       dst_path=tmp)
            raw = config_mod.read_mapping(Path(path))
    except (mlflow.exceptions.MlflowException, OSError, ConfigError) as exc:
        raise UserError(f"run {run_id}: its configuration cannot be rebuilt for a refit (config.yaml: "
                        f"{one_line(exc)}); nothing trained, aliases unchanged") from None
    try:
        return config_mod.from_dict(raw)
    except ConfigError as exc:
        raise UserError(f"run {run_id}: its config.yaml no longer builds ({exc}); nothing trained, "
                        "aliases unchanged") from None


def length(run: Run) -> int:
    """Epochs the trial trained its returned model for: the length the search found best."""
    metrics = run.data.metrics
    epochs = metrics.get("best_epoch") if run.data.params.get("training.restore_best") == "True" \
        else metrics.get("epochs_trained")
    if not epochs or epochs < 1:
        raise UserError(f"run {run.info.run_id} records no epochs_trained metric: nothing to refit "
                        "for; nothing trained, aliases unchanged")
    return int(epochs)


def on_all_images(config, epochs: int, images: int | None = None):
    """`config` trained on every labelled image for `epochs` epochs and no callback that
    watches validation images (there are none left). With `images`, the run is that many
    training images long: its epochs stay `epochs` and each grows to images / epochs, so
    everything counted in epochs (the learning-rate annealer, weight averaging) keeps the
    shape it had in the trial, stretched over the longer run."""
    overrides = {
        "training.epochs": epochs,
        "training.subset_epochs": 0,
        "training.subset_images": 0,
        "training.early_stopping.enabled": False,
        "training.reduce_lr.enabled": False,
        "training.restore_best": False,
    }
    if images:
        batch = config.training.batch_size
        overrides["training.epoch_images"] = math.ceil(images / epochs / batch) * batch
    return config_mod.apply_overrides(config, overrides)


def refit_config(run: Run):
    """The trial's configuration for a refit: its length, every epoch on all images."""
    return on_all_images(rebuild(run), length(run))


def nested(client: MlflowClient, parent: Run, condition: str, kind: str = KIND) -> list[Run]:
    """Runs of `kind` (refits; a search's final models) nested under `parent` that meet
    `condition` (a search filter), newest first."""
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`digitlab.kind` = "
                      f"'{kind}' and {condition}",
        order_by=["attributes.start_time DESC"])


def existing(client: MlflowClient, run: Run, digest: str) -> Run | None:
    """A finished refit of `run` on the same data, if one exists."""
    found = nested(client, run, f"tags.data_digest = '{digest}' and attributes.status = 'FINISHED'")
    return found[0] if found else None


def end_abandoned(client: MlflowClient, parent: Run, condition: str = "", kind: str = KIND) -> None:
    """Runs of `kind` under `parent` whose process on this machine died (kill -9 leaves them
    RUNNING) end KILLED, so the runs table shows none as still going."""
    running = "attributes.status = 'RUNNING'" + (f" and {condition}" if condition else "")
    for stale in nested(client, parent, running, kind):
        if osutil.owner_is_gone(stale.data.tags.get("worker", "")):
            client.set_tag(stale.info.run_id, "error", f"interrupted: the process running this {kind} died")
            client.set_terminated(stale.info.run_id, "KILLED")


def refit(run: Run, data: DigitData, config=None) -> Run:
    """The refit of trial `run` on every labelled image of `data`: an existing one, or a new
    run nested under the trial. `config` is `refit_config(run)` when the caller has checked
    it already."""
    from digitlab import console
    from digitlab.training_run import tracked_run
    from digitlab.validation import AllImages

    client = MlflowClient()
    if found := existing(client, run, data.digest):
        log.info("run %s is already refitted: run %s", run.info.run_id, found.info.run_id)
        return found
    config = config or refit_config(run)
    end_abandoned(client, run)
    tags = {"digitlab.kind": KIND, "refit_of": run.info.run_id, "worker": osutil.worker_id(),
            "trial_number": run.data.tags.get("trial_number", ""),
            "refit_epochs": config.training.epochs}
    name = f"refit {run.info.run_name}"
    log.info("%s: %d epochs on all %d labelled images", name, config.training.epochs,
             len(data.train_labels))
    run_id, _, _ = tracked_run(config, data, name=name, tags=tags, parent_run_id=run.info.run_id,
                               experiment_id=run.info.experiment_id,
                               verbose=2 if console.verbose() else 0,
                               validation=AllImages())
    return client.get_run(run_id)
