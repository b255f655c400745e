"""Searches end to end on tiny real data: real Optuna storage, real KerasTuner, real MLflow."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from digitlab import cli
from digitlab.search import trial as trial_mod
from digitlab.search.settings import Settings
from tests.conftest import TINY_SPACE, kill_during_trial, study_name

SPACE = TINY_SPACE


@pytest.fixture
def space_file(workdir):
    path = workdir / "space.yaml"
    path.write_text(SPACE)
    return path


def runs():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    found = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")
    return found


def split_runs():
    all_runs = runs()
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def search_args(space_file, tiny_dir, *extra):
    return ["search", "--space", str(space_file), "--data-dir", str(tiny_dir), *extra]


def test_optuna_search_logs_parent_and_one_nested_run_per_trial(space_file, tiny_dir, capsys):
    assert cli.main(search_args(space_file, tiny_dir)) == 0
    out = capsys.readouterr().out
    (parent,), children = split_runs()
    assert len(children) == 3
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == study_name("space-optuna", tiny_dir)
    assert parent.data.params["engine"] == "optuna"
    assert parent.data.params["budget.trials"] == "3"
    assert parent.data.params["space"].endswith("space.yaml")
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["engine"] == "optuna"
        assert tags["trial_state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        assert "sampled.model.dropout" in child.data.params
        steps = [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == [1, 2]
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2]
    for child in children:  # trials are ranked by the model they registered, not their best epoch
        assert child.data.metrics["objective"] == child.data.metrics["val_accuracy_final_model"]

    best = max(children, key=lambda c: c.data.metrics["objective"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_trial_number"] == best.data.tags["trial_number"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["objective"])
    assert best.info.run_id in out

    client = MlflowClient()
    paths = {a.path for a in client.list_artifacts(parent.info.run_id)}
    paths |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"trials.csv", "space.yaml", "plots/optimization_history.png",
            "plots/param_importances.png", "plots/parallel_coordinate.png"} <= paths
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.csv").splitlines()
    assert len(table) == 4 and "params.model.dropout" in table[0]
    # every completed trial has its model
    for child in children:
        assert mlflow.search_logged_models(
            filter_string=f"source_run_id = '{child.info.run_id}'", output_format="list")


def test_finished_study_again_does_nothing(space_file, tiny_dir, capsys):
    assert cli.main(search_args(space_file, tiny_dir, "--trials", "1")) == 0
    before = len(runs())
    capsys.readouterr()
    assert cli.main(search_args(space_file, tiny_dir, "--trials", "1")) == 0
    assert "already finished" in capsys.readouterr().err
    assert len(runs()) == before


def test_budget_is_a_total_and_resume_continues_the_parent(space_file, tiny_dir):
    assert cli.main(search_args(space_file, tiny_dir, "--trials", "1")) == 0
    assert cli.main(search_args(space_file, tiny_dir, "--trials", "2")) == 0
    parents, children = split_runs()
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # the resumed study draws new values, not the first call's again
    first, second = ({k: v for k, v in c.data.params.items() if k.startswith("sampled.")} for c in children)
    assert first and first != second


@pytest.mark.parametrize("engine", ["optuna", "kerastuner"])
def test_time_budget_stops_starting_trials_and_the_same_command_goes_on(
        space_file, tiny_dir, capsys, engine, monkeypatch):
    # The trials' time is up as soon as one trial has ended (when the plan says the next one
    # could not end in time: tests/test_final.py), so each call runs exactly one.
    ended = []
    logged, out_of_time = trial_mod.log_outcome, Settings.out_of_time
    monkeypatch.setattr(trial_mod, "log_outcome", lambda *a: (ended.append(a), logged(*a)))
    monkeypatch.setattr(Settings, "out_of_time", lambda self: bool(ended))
    args = search_args(space_file, tiny_dir, "--engine", engine, "--minutes", "30")
    assert cli.main(args) == 0
    assert "the trials' time was used up before all 3 trials, 1 completed" in capsys.readouterr().out
    (parent,), children = split_runs()
    assert len(children) == 1
    assert parent.data.params["budget.minutes"] == "30.0"
    assert parent.info.status == "FINISHED"
    ended.clear()
    assert cli.main(args) == 0
    (again,), children = split_runs()
    assert again.info.run_id == parent.info.run_id and len(children) == 2
    assert all(c.data.tags["trial_state"] == "COMPLETE" for c in children)
    assert "before all 3 trials, 2 completed" in capsys.readouterr().out
    # Without a time budget the study runs to its trial budget.
    monkeypatch.setattr(Settings, "out_of_time", out_of_time)
    assert cli.main(search_args(space_file, tiny_dir, "--engine", engine)) == 0
    assert "time was used up" not in capsys.readouterr().out
    assert len(split_runs()[1]) == 3


@pytest.mark.parametrize("engine", ["optuna", "kerastuner"])
def test_a_new_study_starts_from_the_start_values(workdir, tiny_dir, engine):
    path = workdir / "start.yaml"
    path.write_text(SPACE.replace("tuner: random", "tuner: hyperband") + "start: {model.dropout: 0.25}\n")
    assert cli.main(search_args(path, tiny_dir, "--engine", engine, "--trials", "1")) == 0
    # resumed: the start values are not tried again
    assert cli.main(search_args(path, tiny_dir, "--engine", engine, "--trials", "3")) == 0
    _, children = split_runs()
    trials = {int(c.data.tags["trial_number"]): c.data.params for c in children}
    assert sorted(trials) == [0, 1, 2]
    assert float(trials[0]["sampled.model.dropout"]) == 0.25
    assert all(float(trials[n]["sampled.model.dropout"]) != 0.25 for n in (1, 2))
    # a key that start does not give is drawn as usual
    assert 1e-3 <= float(trials[0]["sampled.optimizer.learning_rate"]) <= 1e-2


def test_resuming_with_another_space_or_direction_is_an_error(space_file, tiny_dir, workdir, capsys):
    assert cli.main(search_args(space_file, tiny_dir, "--trials", "1", "--study", "s")) == 0
    other = workdir / "other.yaml"
    other.write_text(SPACE.replace("high: 0.5", "high: 0.4"))
    capsys.readouterr()
    assert cli.main(search_args(other, tiny_dir, "--study", "s")) == 2
    assert "different search file" in capsys.readouterr().err
    flipped = workdir / "flipped.yaml"
    flipped.write_text(SPACE.replace("maximize", "minimize"))
    assert cli.main(search_args(flipped, tiny_dir, "--study", "s")) == 2
    assert "use another --study name" in capsys.readouterr().err


def test_same_seed_samples_the_same_parameters_in_order(space_file, tiny_dir):
    for study in ("a", "b"):
        assert cli.main(search_args(space_file, tiny_dir, "--study", study, "--seed", "7")) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("optuna.journal"))
    a = [t.params for t in optuna.load_study(study_name="a", storage=storage).trials]
    b = [t.params for t in optuna.load_study(study_name="b", storage=storage).trials]
    assert a == b and len(a) == 3
    _, children = split_runs()
    for child in children:  # each trial its own seed, all scored on the study seed's split
        config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/config.yaml"))
        assert config["seed"] == 7 + int(child.data.tags["trial_number"])
        assert config["training"]["split_seed"] == 7
    assert children[0].data.tags["data_digest"] and children[0].data.tags["version.keras"]


def test_a_pruned_trial_is_visibly_pruned(workdir, tiny_dir, space_file):
    from digitlab import data, store
    from digitlab.search import search_file

    store.configure()
    parent = MlflowClient().create_run(
        mlflow.get_experiment_by_name("digit-recognizer").experiment_id).info.run_id
    s = search_file.load(space_file)
    outcome = trial_mod.run_trial(
        s, {"model.dropout": 0.2, "optimizer.learning_rate": 0.003}, data=data.load(tiny_dir),
        seed=1, engine="optuna", number=0, parent_run_id=parent,
        experiment_id=mlflow.get_experiment_by_name("digit-recognizer").experiment_id,
        report=lambda step, value: step >= 1,  # the engine says: prune after epoch 1
    )
    assert outcome.state == trial_mod.PRUNED and outcome.epochs == 1
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags["trial_state"] == "PRUNED"
    assert run.info.status == "KILLED"


def test_median_pruner_prunes_in_a_real_study(workdir, tiny_dir):
    path = workdir / "prune.yaml"
    path.write_text(SPACE.replace("pruner: none", "pruner: median").replace("trials: 3", "trials: 6")
                    .replace("max_epochs: 2", "max_epochs: 4")
                    .replace("low: 1.0e-3, high: 1.0e-2", "low: 1.0e-5, high: 1.0e-2"))
    assert cli.main(search_args(path, tiny_dir)) == 0
    _, children = split_runs()
    states = [c.data.tags["trial_state"] for c in children]
    assert len(children) == 6
    assert "PRUNED" in states, states
    for child in children:
        if child.data.tags["trial_state"] == "PRUNED":
            assert child.info.status == "KILLED"


def test_progress_bar_names_the_trial_the_ranking_picks_on_a_tie(workdir, space_file, capsys):
    from digitlab import search
    from digitlab.search import runner, search_file
    from digitlab.search.plan import Plan

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    exp = client.create_experiment("progress")
    parent = client.create_run(exp).info.run_id
    for number, objective, crossentropy in ((0, 0.99, 0.05), (1, 0.98, 0.01), (2, 0.99, 0.03)):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "trial_state": "COMPLETE",
                                           "trial_number": str(number)}).info.run_id
        client.log_metric(run, "objective", objective)
        client.log_metric(run, "val_crossentropy", crossentropy)

    class ThreeFinished:  # the engine's side: how many trials have finished
        def finished(self):
            return 3

    settings = search.Settings(study_file=search_file.load(space_file), engine="optuna", study="s",
                               storage=None, workers=1, data_dir=None, seed=1)
    plan = Plan(epoch_seconds=1.0, epochs=2, first_rung=1, runs_per_trial=1, epoch_images=270,
                train_images=270)
    runner.Progress(ThreeFinished(), settings, parent, plan).close()
    # Trials 0 and 2 tie at 0.99; trial 2 has the lower validation cross-entropy.
    assert "best val_accuracy=0.9900, trial=2" in capsys.readouterr().err
    # a K-fold study's objective is the out-of-fold score, and the bar says so
    folded = dataclasses.replace(settings.study_file, validation={"kind": "kfold", "folds": 3})
    kfold = dataclasses.replace(settings, study_file=folded)
    runner.Progress(ThreeFinished(), kfold, parent, plan).close()
    assert "best oof_accuracy=0.9900, trial=2" in capsys.readouterr().err


def test_search_plots_number_trials_as_the_runs_do(workdir, space_file):
    """Pruned and failed trials keep their numbers in the replayed study behind the plots."""
    from digitlab import search
    from digitlab.search import report, search_file

    settings = search.Settings(study_file=search_file.load(space_file), engine="optuna", study="s",
                               storage=None, workers=1, data_dir=None, seed=1)
    sampled = {"params.model.dropout": 0.2, "params.optimizer.learning_rate": 0.003}
    rows = [{"number": 3, "state": "COMPLETE", "value": 0.9, **sampled},
            {"number": 0, "state": "PRUNED", "value": None, **sampled},
            {"number": 1, "state": "FAIL", "value": None}]
    study = report.replay(settings, rows)
    assert [(t.number, t.state.name, t.value) for t in study.trials] == [
        (0, "PRUNED", None), (1, "FAIL", None), (2, "FAIL", None), (3, "COMPLETE", 0.9)]
    assert study.best_trial.number == 3 and study.best_trial.params["model.dropout"] == 0.2


def test_hyperband_prunes_no_trial_before_min_epochs(workdir, tiny_dir):
    # Without min_epochs, Hyperband over 4 epochs judges trials after epochs 1 and 3.
    path = workdir / "hyperband.yaml"
    path.write_text(SPACE.replace("pruner: none", "pruner: hyperband, min_epochs: 2")
                    .replace("trials: 3", "trials: 6").replace("max_epochs: 2", "max_epochs: 4")
                    .replace("low: 1.0e-3, high: 1.0e-2", "low: 1.0e-5, high: 1.0e-2"))
    assert cli.main(search_args(path, tiny_dir)) == 0
    _, children = split_runs()
    client = MlflowClient()
    epochs = {c.data.tags["trial_state"]: set() for c in children}
    for child in children:
        epochs[child.data.tags["trial_state"]].add(
            len(client.get_metric_history(child.info.run_id, "val_accuracy")))
    assert epochs == {"COMPLETE": {4}, "PRUNED": {2}}, epochs


def test_nan_loss_fails_trials_and_stops_after_consecutive_failures(workdir, tiny_dir, capsys):
    path = workdir / "nan.yaml"
    path.write_text(SPACE.replace("fixed:\n", "fixed:\n  optimizer.name: sgd\n")
                    .replace("low: 1.0e-3, high: 1.0e-2", "low: 1.0e+15, high: 1.0e+20"))
    assert cli.main(search_args(path, tiny_dir)) == 1
    assert "2 trials failed in a row" in capsys.readouterr().err
    parents, children = split_runs()
    assert len(children) == 2
    for child in children:
        assert child.data.tags["trial_state"] == "FAIL"
        assert child.info.status == "FAILED"
        assert "non-finite" in child.data.tags["error"]
        assert child.data.tags["fail_reason"] == "diverged"
        assert "objective" not in child.data.metrics  # never ranked
        assert not mlflow.search_logged_models(filter_string=f"source_run_id = '{child.info.run_id}'",
                                               output_format="list")  # never promoted
    assert parents[0].info.status == "FAILED"


def test_an_exception_fails_one_trial_and_the_search_goes_on(space_file, tiny_dir, monkeypatch):
    real = trial_mod.train.run
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # injected fault: the first trial's training raises
        if kwargs.get("on_epoch") is None:  # the budget's untracked timing run, not a trial
            return real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_mod.train, "run", flaky)
    assert cli.main(search_args(space_file, tiny_dir)) == 0
    _, children = split_runs()
    states = sorted(c.data.tags["trial_state"] for c in children)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    failed = next(c for c in children if c.data.tags["trial_state"] == "FAIL")
    assert "MemoryError: injected" in failed.data.tags["error"]


def test_kerastuner_search(space_file, tiny_dir):
    assert cli.main(search_args(space_file, tiny_dir, "--engine", "kerastuner")) == 0
    (parent,), children = split_runs()
    assert parent.data.params["engine"] == "kerastuner"
    assert len(children) == 3
    assert {c.data.tags["engine"] for c in children} == {"kerastuner"}
    assert {c.data.tags["trial_state"] for c in children} == {"COMPLETE"}
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    paths = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in paths


@pytest.mark.parametrize("engine", ["optuna", "kerastuner"])
def test_sigkill_in_a_trial_then_resume(engine, space_file, tiny_dir, workdir):
    path = workdir / "long.yaml"
    path.write_text(SPACE.replace("max_epochs: 2", "max_epochs: 3"))
    args = search_args(path, tiny_dir, "--engine", engine, "--trials", "2")
    marker = "trial 1: "
    kill_during_trial(args, workdir, marker)
    parents, children = split_runs()
    assert len(parents) == 1
    assert any(c.info.status == "RUNNING" for c in children)  # left behind by SIGKILL
    interrupted_id = next(c.info.run_id for c in children if c.info.status == "RUNNING")

    assert cli.main(args) == 0
    parents_after, children = split_runs()
    assert [p.info.run_id for p in parents_after] == [parents[0].info.run_id]
    assert parents_after[0].info.status == "FINISHED"
    by_id = {c.info.run_id: c for c in children}
    assert by_id[interrupted_id].info.status == "KILLED"
    assert by_id[interrupted_id].data.tags["trial_state"] == "FAIL"
    assert not [c for c in children if c.info.status == "RUNNING"]
    completed = [c for c in children if c.data.tags["trial_state"] == "COMPLETE"]
    assert len(completed) == 2  # the budget: two finished trials
    # the interrupted trial's parameters were tried again, once
    retried = [c for c in completed
               if c.data.params["sampled.model.dropout"] == by_id[interrupted_id].data.params["sampled.model.dropout"]]
    assert len(retried) == 1
    assert len(children) == 3  # exactly one run per trial attempt


@pytest.mark.slow
def test_two_workers_share_one_study(space_file, tiny_dir, workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "digitlab", *search_args(space_file, tiny_dir, "--workers", "2",
                                                        "--trials", "6", "--max-epochs", "1")],
        cwd=workdir, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "locked" not in output.lower()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(workdir / "optuna.journal")))
    study = optuna.load_study(study_name=study_name("space-optuna", tiny_dir), storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6 and len(study.trials) == 6
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2  # both processes ran trials
    # each drew its own values: neither repeated the other's random start
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6
    (parent,), children = split_runs()
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.params["workers"] == "2"


def test_mlflow_run_search_entry_point(space_file, tiny_dir, workdir):
    from tests.test_mlproject import mlflow_run

    proc = mlflow_run(workdir, "search", f"space={space_file}", "trials=2", "max_epochs=1",
                      f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,), children = split_runs()
    assert len(children) == 2
    assert parent.data.params["engine"] == "optuna"
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == study_name("space-optuna", tiny_dir)
    # The same command on the finished study trains nothing; the run MLflow opened for it
    # points at the study's parent run instead of standing there empty.
    proc = mlflow_run(workdir, "search", f"space={space_file}", "trials=2", "max_epochs=1",
                      f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                  filter_string="tags.resumed_search_run_id LIKE '%'")
    assert again.data.tags["resumed_search_run_id"] == parent.info.run_id
    assert parent.info.run_id in again.data.tags["mlflow.note.content"]


def test_bad_engine_and_workers_are_errors(space_file, tiny_dir, capsys):
    with pytest.raises(SystemExit) as refused:  # argparse's choices: before anything runs
        cli.main(search_args(space_file, tiny_dir, "--engine", "grid"))
    assert refused.value.code == 2
    assert "argument --engine: invalid choice: 'grid'" in capsys.readouterr().err
    assert cli.main(search_args(space_file, tiny_dir, "--engine", "kerastuner", "--workers", "2")) == 2
    assert not Path("optuna.journal").exists() and not Path("mlflow.db").exists()


@pytest.mark.parametrize("min_epochs", [1, 2])
def test_median_pruner_judges_from_min_epochs(workdir, min_epochs):
    from digitlab import search
    from digitlab.search import optuna_engine, search_file

    path = workdir / "median.yaml"
    path.write_text(SPACE.replace("pruner: none", f"pruner: median, min_epochs: {min_epochs}"))
    settings = search.Settings(study_file=search_file.load(path), engine="optuna", study="s", storage=None,
                               workers=1, data_dir=None, seed=1)
    study = optuna.create_study(direction="maximize", pruner=optuna_engine._pruner(settings))
    for _ in range(3):  # the pruner's startup trials, all good from the first epoch
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.9, 2: 0.9}))
    weak = study.ask()
    weak.report(0.1, 1)
    assert weak.should_prune() == (min_epochs == 1)
    weak.report(0.1, 2)
    assert weak.should_prune()
