"""The MLproject entry points, run the way users run them: `mlflow run . --env-manager local`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import EXPERIMENTS, REPO, TINY_SPACE, study_name

pytestmark = pytest.mark.subprocess


def mlflow_run(workdir: Path, entry: str, *params: str, experiment: str | None = "digit-recognizer",
               env_manager: str = "local", project: str = ".") -> subprocess.CompletedProcess:
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(REPO / name, workdir / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           # MLflow reuses an environment whose conda.yaml it has seen before, whatever
           # the project's code is now: each test builds its own from this checkout.
           "MLFLOW_ENV_ROOT": str(workdir / "mlflow-envs")}
    args = [str(Path(sys.executable).parent / "mlflow"), "run", project, "-e", entry,
            "--env-manager", env_manager]
    if experiment:
        args += ["--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def finished_runs(workdir: Path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")


def test_main_entry_point(workdir, tiny_dir):
    # config overrides as --set takes them, several in one parameter (a value with spaces too)
    proc = mlflow_run(workdir, "main", "experiment=dnn", "epochs=1", f"data_dir={tiny_dir}",
                      "set=model.dropout=0.25 model.dense_units=[32, 16]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = finished_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["experiment"] == "dnn"
    assert "best_val_accuracy" in run.data.metrics
    assert run.data.params["model.dropout"] == "0.25" and run.data.params["model.dense_units"] == "[32, 16]"


def test_the_readme_loop_lands_in_digit_recognizer_without_naming_an_experiment(workdir, tiny_dir):
    """`mlflow run . -e search -P space=quick ...`, then promote with -P flags, then submit,
    as the README gives them: no --experiment-name, no MLFLOW_EXPERIMENT_NAME."""
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    data = f"data_dir={tiny_dir}"
    proc = mlflow_run(workdir, "search", "space=quick", "trials=2", "max_epochs=1", data,
                      experiment=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = mlflow_run(workdir, "promote", "tta=true", "force=true", data, experiment=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = mlflow_run(workdir, "submit", data, experiment=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((workdir / "submissions" / "submission.csv").read_text().splitlines()) == 51

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (search,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                   filter_string="tags.search_study LIKE '%'")
    assert search.data.tags["search_study"] == study_name("quick-optuna", tiny_dir)
    assert search.data.params["budget.trials"] == "2"
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["search_run_id"] == search.info.run_id
    assert version.tags["tta"] == "true"
    submit = MlflowClient().get_run(version.tags["last_submission_run_id"])
    assert submit.info.experiment_id == search.info.experiment_id
    assert submit.data.tags["mlflow.parentRunId"] == version.run_id  # not a top-level row
    # MLflow's own runs stay in Default (it cannot move them), empty, saying where we logged
    launched = mlflow.search_runs(experiment_names=["Default"], output_format="list")
    assert len(launched) == 3
    assert {r.data.tags["digitlab.logged_in"] for r in launched} == {"digit-recognizer"}
    assert all(not r.data.metrics for r in launched)


def test_values_with_dollar_space_and_quote_arrive_intact(workdir, tiny_dir):
    """MLflow shell-quotes every -P value: the MLproject commands must not quote them again."""
    (workdir / "space.yaml").write_text(TINY_SPACE)
    study = "it's $HOME's study"
    storage = workdir / "a folder with spaces" / "my $tudy's.journal"
    proc = mlflow_run(workdir, "search", "space=space.yaml", f"data_dir={tiny_dir}", "trials=1",
                      "max_epochs=1", f"study={study}", f"storage={storage}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert storage.is_file()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (parent,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                   filter_string="tags.search_study LIKE '%'")
    assert parent.data.tags["search_study"] == study
    assert parent.info.run_name == study


@pytest.mark.slow
def test_search_entry_point_in_a_uv_environment(workdir, tiny_dir):
    """`--env-manager uv` builds an environment from conda.yaml's Python version and pip
    section (the project and its dependencies) and runs the entry point in it."""
    (workdir / "space.yaml").write_text(TINY_SPACE)
    proc = mlflow_run(workdir, "search", f"space={workdir / 'space.yaml'}", f"data_dir={tiny_dir}",
                      "trials=1", "max_epochs=1", f"storage={workdir / 'optuna.journal'}",
                      env_manager="uv", project=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (parent,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                   filter_string="tags.search_study LIKE '%'")
    assert parent.data.tags["mlflow.project.env"] == "uv"
    assert parent.data.tags["search_study"] == study_name("space-optuna", tiny_dir)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_main_entry_point_for_each_experiment_on_the_embedded_default(workdir, experiment):
    proc = mlflow_run(workdir, "main", f"experiment={experiment}", "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = finished_runs(workdir)
    assert run.data.params["data.train_rows"] == "4000"
    assert run.data.metrics["holdout_accuracy"] > 0.2  # well above chance (0.1) after one epoch
