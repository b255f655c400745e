"""The search's final stage (search/final.py) and the budget's plan (search/plan.py): final
models on every labelled image for the planned length, one budget split between trials and
final training, promotion of the final models, and a kill during final training."""

import json
import os
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, data
from digitlab.errors import UserError
from digitlab.registry.evaluation import to_rows
from digitlab.registry.members import keras_file
from digitlab.search import ensemble, final
from digitlab.search import plan as plan_mod
from digitlab.search.plan import Plan
from digitlab.search.search_file import Budget, FinalTraining
from tests.conftest import TINY_SPACE, kill_during_trial

# Three trials of two epochs of 320 images (the tiny data's 270 training images), a
# learning-rate annealer, then two final models of 4 passes over all 300 labelled images.
STUDY = TINY_SPACE.replace(
    "budget: {trials: 3, max_epochs: 2}",
    "budget: {trials: 3, max_epochs: 2, epoch_images: 320}\nfinal: {models: 2, passes: 4}",
).replace("  model.dense_units: [32]", "  model.dense_units: [32]\n  training.lr_decay: 0.5")
LABELLED, FINAL_IMAGES = 300, 1200


def kaggle_plan(**changes) -> Plan:
    """A plan as measured at Kaggle's size: a 40-epoch trial of 3,840-image epochs takes
    4 minutes, a training batch of 64 takes 0.1 s, 42,000 labelled images."""
    values = dict(epoch_seconds=6.0, epochs=40, first_rung=1, runs_per_trial=1, epoch_images=3840,
                  train_images=39900, step_seconds=0.1, batch_size=64, labelled_images=42000)
    return Plan(**{**values, **changes})


def test_without_a_total_the_trials_get_their_minutes_and_final_training_its_length():
    plan = kaggle_plan().split(Budget(search_minutes=16), FinalTraining(models=2, passes=16))
    assert (plan.search_seconds, plan.final_models, plan.final_images) == (960, 2, 672_000)
    assert plan.final_seconds() == pytest.approx(1050)  # 10,500 batches of 0.1 s
    assert plan.total_seconds == pytest.approx(960 + 2100)
    assert plan.line() == (
        "plan: search 16.0 min, about 4 full trials (40 epochs of 3,840 images, from 39,900 "
        "training images: 4.0 min each) or 160 first-rung ones (1 epoch, 6 s each); final "
        "training 35.0 min, 2 models of 16 passes (672,000 images, 17.5 min each) on all "
        "42,000 labelled images; 51.0 min in all")


def test_a_total_is_split_and_buys_more_final_models_when_it_grows():
    two_hours = kaggle_plan().split(Budget(minutes=120), FinalTraining(models=2, passes=16, share=0.5))
    # half of 120 minutes fits three 17.5-minute final models; the trials get the rest
    assert two_hours.final_models == 3 and two_hours.final_images == 672_000
    assert two_hours.search_seconds == pytest.approx(7200 - 3 * 1050)
    assert two_hours.total_seconds == pytest.approx(7200)
    # 20 minutes: one final model, shortened to its half (never below a trial's length)
    short = kaggle_plan().split(Budget(minutes=20), FinalTraining(models=2, passes=16, share=0.5))
    assert short.final_models == 1 and short.final_images == 6000 * 64
    assert short.search_seconds == pytest.approx(600) and short.total_seconds == pytest.approx(1200)


def test_a_final_model_is_never_shorter_than_a_trial():
    # the demo's 4,000 images: 16 passes are 64,000 images, a trial 153,600
    demo = kaggle_plan(labelled_images=4000, train_images=3800).split(
        Budget(search_minutes=16), FinalTraining(models=2, passes=16))
    assert demo.final_images == 40 * 3840


def test_a_budget_too_small_for_one_trial_and_one_final_model_says_what_fits():
    with pytest.raises(UserError) as caught:
        kaggle_plan().split(Budget(minutes=5), FinalTraining(models=2, passes=16))
    assert str(caught.value) == ("--minutes 5 is too short here: one full trial takes 4.0 min and one "
                                 "final model at least 4.0 min; give --minutes 8 or more, or fewer "
                                 "--max-epochs")
    with pytest.raises(UserError, match="one full trial takes 4.0 min; give --minutes 4 or more"):
        kaggle_plan().split(Budget(minutes=2), FinalTraining())


def test_time_left_counts_the_trials_then_final_training():
    plan = kaggle_plan().split(Budget(search_minutes=16), FinalTraining(models=2, passes=16))
    # at first a full trial's cost per trial, capped by the trials' time, plus final training
    assert plan.seconds_left(0, 24, 0) == pytest.approx(960 + 2100)
    assert plan.seconds_left(2, 4, 100) == pytest.approx(100 + 2100)


@pytest.fixture
def searched(workdir, tiny_dir, capsys):
    """The study searched, with its final stage, and what the command printed."""
    (workdir / "study.yaml").write_text(STUDY)
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    return capsys.readouterr()


def children(parent_id: str, condition: str = "") -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digit-recognizer").experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'"
                              + (f" and {condition}" if condition else ""))


def search_run():
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digit-recognizer").experiment_id
    (run,) = client.search_runs([experiment], "tags.search_study LIKE 'study-optuna-%'")
    return run


def test_final_models_train_on_every_labelled_image_for_the_planned_length(searched, tiny_dir):
    assert "2 models of 4 passes (1,200 images" in searched.err
    parent = search_run()
    client = MlflowClient()
    finals = sorted(children(parent.info.run_id, "tags.`digitlab.kind` = 'final'"),
                    key=lambda r: r.data.tags["final_index"])
    assert [r.info.status for r in finals] == ["FINISHED", "FINISHED"]
    assert parent.data.tags[final.RUNS_TAG] == ",".join(r.info.run_id for r in finals)
    trials = {r.info.run_id: r for r in children(parent.info.run_id, "tags.trial_state = 'COMPLETE'")}
    ranked = [parent.data.tags["best_run_id"]]
    # the heaviest configuration greedy selection picks first (the best trial's, which it
    # starts from); the second model is another configuration or another seed of it
    assert finals[0].data.tags["refit_of"] == ranked[0]
    first, second = ((r.data.tags["refit_of"], r.data.params["seed"]) for r in finals)
    assert first != second
    for run in finals:
        m = run.data.metrics
        # every labelled image, none held out, for the planned length in the trial's 2 epochs
        assert m["subset_size"] == LABELLED and "val_accuracy" not in m
        # (each of the 2 epochs rounded up to whole batches)
        batch = int(run.data.params["training.batch_size"])
        epoch = -(-FINAL_IMAGES // 2 // batch) * batch
        assert run.data.params["training.epoch_images"] == str(epoch)
        assert m["epochs_trained"] == 2 and m["images_seen"] == 2 * epoch >= FINAL_IMAGES
        # the annealer keeps the trial's shape over the longer run: the same rate per epoch
        trial = trials[run.data.tags["refit_of"]]
        rates = [h.value for h in client.get_metric_history(run.info.run_id, "learning_rate")]
        trial_rates = [h.value for h in client.get_metric_history(trial.info.run_id, "learning_rate")]
        assert rates == pytest.approx(trial_rates) and rates[1] == pytest.approx(rates[0] * 0.5)
    assert f"final training: 2 models on every labelled image (MLflow runs {finals[0].info.run_id}, " \
           f"{finals[1].info.run_id}); promote registers their weighted average" in searched.out


def test_promote_registers_the_final_models_and_their_average_is_served(searched, tiny_dir, capsys):
    import keras

    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    assert "version 1 is now production" in capsys.readouterr().out
    client = MlflowClient()
    parent = search_run()
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    finals = parent.data.tags[final.RUNS_TAG].split(",")
    assert version.tags["members"] == ",".join(finals)
    assert version.tags["final"] == "true" and version.tags["final_images"] == str(FINAL_IMAGES)
    # the weights greedy selection gave the trials on their held-out predictions
    weights = final.weights(parent)
    assert version.tags["final_weights"] == ",".join(f"{w:.4g}" for w in weights)
    assert sum(weights) == pytest.approx(1.0)
    runs = [client.get_run(i) for i in finals]
    assert [float(r.data.tags["final_weight"]) for r in runs] == pytest.approx(weights)
    assert version.tags["final_seeds"] == ",".join(r.data.params["seed"] for r in runs)
    assert version.tags["final_trials"] == ",".join(r.data.tags["trial_number"] for r in runs)
    assert "4 passes (1,200 images) each" in version.description
    # what is served is the final models' average, weight for weight
    served = mlflow.pyfunc.load_model("models:/digit-recognizer@production")
    dataset = data.load(tiny_dir)
    rows = to_rows(dataset.test_images)
    probabilities = served.predict(rows)[[f"prob_{k}" for k in range(10)]].to_numpy()
    models = [keras.saving.load_model(keras_file(i), compile=False) for i in finals]
    mixed = sum(w * m.predict(dataset.test_images, verbose=0) for w, m in zip(weights, models, strict=True))
    np.testing.assert_allclose(probabilities, mixed, atol=1e-5)


def test_members_and_weights_follow_greedy_selection_then_seeds_of_the_heaviest():
    from types import SimpleNamespace as NS

    def trial(number: int, seed: int):
        return NS(info=NS(run_id=f"run{number}"), data=NS(params={"seed": str(seed)},
                                                         tags={"trial_number": str(number)}))

    a, b = trial(3, 45), trial(7, 49)
    chosen = ensemble.Choice(members=[a, b], weights=[0.75, 0.25], log_loss=0.1,
                             best_single_log_loss=0.2, images=10, skipped=0)
    members = final.allot(chosen.members, chosen.weights, 4)
    assert [(m.trial_number, m.seed) for m in members] == [("3", 45), ("7", 49), ("3", 1045), ("3", 2045)]
    # a configuration's weight is shared by its seeds
    assert [m.weight for m in members] == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert [m.weight for m in final.allot([a, b], [0.75, 0.25], 1)] == pytest.approx([1.0])


def test_a_final_model_that_cannot_end_in_time_does_not_start(workdir, tiny_dir):
    (workdir / "study.yaml").write_text(STUDY.replace("final: {models: 2, passes: 4}", ""))
    assert cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]) == 0
    parent = search_run()
    dataset = data.load(tiny_dir)
    # three models, the budget's end reached: the first trains (the trials' time was cut to
    # leave it room), the others cannot end in time (each timed by its trial's own speed)
    ids = final.run_stage(parent.info.run_id, dataset, 3, FINAL_IMAGES, seconds_per_model=100,
                          deadline=time.time())
    assert len(ids) == 1
    assert len(children(parent.info.run_id, "tags.`digitlab.kind` = 'final'")) == 1
    assert json.loads(MlflowClient().get_run(parent.info.run_id).data.tags[final.PLAN_TAG])["images"] == FINAL_IMAGES


def test_no_trial_starts_that_cannot_end_within_the_trials_time(workdir, tiny_dir, capsys, monkeypatch):
    (workdir / "study.yaml").write_text(STUDY)
    args = ["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]
    assert cli.main([*args, "--trials", "1"]) == 0
    capsys.readouterr()
    measured = plan_mod.measure

    def no_time_for_a_trial(settings, dataset):
        # the trials' time is exactly one full trial long: none may start after the plan is made
        plan = measured(settings, dataset)
        return plan.__class__(**{**plan.__dict__, "search_seconds": plan.trial_seconds})

    monkeypatch.setattr(plan_mod, "measure", no_time_for_a_trial)
    time.sleep(0.01)
    assert cli.main([*args, "--trials", "3"]) == 0
    out = capsys.readouterr().out
    parent = search_run()
    assert len(children(parent.info.run_id, "tags.trial_state = 'COMPLETE'")) == 1
    assert "the trials' time was used up before all 3 trials, 1 completed" in out


def test_a_budget_too_small_is_one_line_and_creates_nothing(workdir, tiny_dir, capsys, monkeypatch):
    (workdir / "study.yaml").write_text(STUDY)
    measured = plan_mod.measure

    def slow_machine(settings, dataset):  # a trial of 2 epochs takes 2 minutes here
        plan = measured(settings, dataset)
        slow = plan.__class__(**{**plan.__dict__, "epoch_seconds": 60.0, "step_seconds": 6.0,
                                 "search_seconds": None, "final_models": 0})
        return slow.split(settings.study_file.budget, settings.study_file.final)

    monkeypatch.setattr(plan_mod, "measure", slow_machine)
    code = cli.main(["search", "--space", "study.yaml", "--data-dir", str(tiny_dir), "--minutes", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("digitlab: error: --minutes 3 is too short here: one full trial takes "
                             "2.0 min and one final model at least")
    assert err[0].endswith("give --minutes 4 or more, or fewer --max-epochs")
    assert not (workdir / "optuna.journal").exists()
    assert not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])


@pytest.mark.slow
def test_kill_during_final_training_moves_no_alias_and_the_same_command_finishes_it(workdir, tiny_dir):
    (workdir / "study.yaml").write_text(STUDY.replace("passes: 4", "passes: 40"))
    run = [sys.executable, "-m", "digitlab"]
    search = ["search", "--space", "study.yaml", "--data-dir", str(tiny_dir)]
    kill_during_trial(search, workdir, "final 1/2", epoch_line="accuracy:")  # no validation
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    parent = search_run()
    (dead,) = children(parent.info.run_id, "tags.`digitlab.kind` = 'final'")
    assert dead.info.status == "RUNNING" and final.pending(parent)
    # promote does not register a trial in the final models' place, and nothing moves
    refused = subprocess.run([*run, "promote", "--data-dir", str(tiny_dir)], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (f"digitlab: error: search run {parent.info.run_id} has not finished "
                                      "its final training: run the same digitlab search command again "
                                      "to finish it (or promote a trial with --ensemble 1)")
    assert not client.search_registered_models()

    again = subprocess.run([*run, *search], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    finals = children(parent.info.run_id, "tags.`digitlab.kind` = 'final' and attributes.status = 'FINISHED'")
    assert len(finals) == 2
    assert len(children(parent.info.run_id, "tags.trial_state = 'COMPLETE'")) == 3  # no trial again
    assert sorted(search_run().data.tags[final.RUNS_TAG].split(",")) == sorted(r.info.run_id for r in finals)
    done = subprocess.run([*run, "promote", "--data-dir", str(tiny_dir)], capture_output=True, text=True)
    assert done.returncode == 0 and "version 1 is now production" in done.stdout
