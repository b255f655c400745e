"""The MLproject entry points, run the way users run them: `mlflow run . --env-manager local`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import EXPERIMENTS, REPO, TINY_SPACE


def mlflow_run(workdir: Path, entry: str, *params: str,
               experiment: str | None = "digit-recognizer") -> subprocess.CompletedProcess:
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(REPO / name, workdir / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local"]
    if experiment:
        args += ["--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def finished_runs(workdir: Path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")


def test_main_entry_point(workdir, tiny_dir):
    proc = mlflow_run(workdir, "main", "experiment=dnn", "epochs=1", f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = finished_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["experiment"] == "dnn"
    assert "best_val_accuracy" in run.data.metrics


def test_search_then_promote_without_naming_an_experiment(workdir, tiny_dir):
    """Plain `mlflow run . -e search` logs into MLflow's Default experiment; promote follows it."""
    (workdir / "space.yaml").write_text(TINY_SPACE)
    data = f"data_dir={tiny_dir}"
    proc = mlflow_run(workdir, "search", "space=space.yaml", data, experiment=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(REPO / "registry", workdir / "registry")
    proc = mlflow_run(workdir, "promote", data, experiment=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (search,) = mlflow.search_runs(experiment_names=["Default"], output_format="list",
                                   filter_string="tags.search_study LIKE '%'")
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["search_run_id"] == search.info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_main_entry_point_for_each_experiment_on_the_embedded_default(workdir, experiment):
    proc = mlflow_run(workdir, "main", f"experiment={experiment}", "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = finished_runs(workdir)
    assert run.data.params["data.train_rows"] == "4000"
    assert run.data.metrics["holdout_accuracy"] > 0.2  # well above chance (0.1) after one epoch
