"""`digitlab compare`: several experiments, one parent run, a comparison chart."""

from __future__ import annotations

import logging

import mlflow
import pandas as pd

from digitlab import plots, tracking, train
from digitlab.config import ExperimentConfig
from digitlab.data import DigitData
from digitlab.errors import TrainingFailed
from digitlab.training_run import tracked_run

log = logging.getLogger(__name__)


def compare(configs: list[ExperimentConfig], data: DigitData, name: str = "compare",
            verbose: int | str = "auto") -> pd.DataFrame:
    """Train each config as a nested run; log a table and a chart to the parent run."""
    rows = []
    with tracking.open_run(name):
        mlflow.log_params({"experiments": ",".join(c.name for c in configs),
                           "data.digest": data.digest})
        mlflow.set_tag("data_digest", data.digest)
        for config in configs:
            log.info("%s", train.length_line(config, data))
            try:
                run_id, result, _ = tracked_run(config, data, nested=True, verbose=verbose)
            except TrainingFailed as exc:  # its run ended FAILED; the others still compare
                log.warning("%s: %s", config.name, exc)
                continue
            rows.append(
                {
                    "experiment": config.name,
                    "run_id": run_id,
                    "best_val_accuracy": result.best_val_accuracy,
                    "final_val_loss": result.history["val_loss"][-1],
                    "holdout_accuracy": result.holdout_accuracy,
                    "parameters": result.model.count_params(),
                    "epochs_trained": result.epochs_trained,
                    "train_seconds": round(result.train_seconds, 2),
                }
            )
        if not rows:
            raise TrainingFailed("every experiment failed to train", "all failed")
        table = pd.DataFrame(rows)
        mlflow.log_text(table.to_csv(index=False), "comparison.csv")
        tracking.log_figure(plots.comparison(rows), "plots/comparison.png")
        best = table.loc[table["best_val_accuracy"].idxmax()]
        mlflow.set_tags({"best_experiment": best["experiment"], "best_run_id": best["run_id"]})
        mlflow.log_metric("best_val_accuracy", float(best["best_val_accuracy"]))
    return table
