"""Faults a user meets when a run or a file goes wrong: each ends in one clear line, a FAILED
run that nothing can rank or register, or a stopped process tree; never a traceback."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from digitlab import cli, data, osutil, registry, submission
from digitlab.errors import DataError
from tests.conftest import TINY_SPACE, free_port, wait_healthy

# --- diverged or chance-level training --------------------------------------------------

# Adam at a learning rate of 50-100: losses in the tens of thousands and chance accuracy,
# yet every number finite, so the NaN check alone lets such trials through.
DIVERGING_SPACE = (TINY_SPACE.replace("trials: 3", "trials: 2")
                   .replace("max_consecutive_failures: 2", "max_consecutive_failures: 3")
                   .replace("low: 1.0e-3, high: 1.0e-2", "low: 50.0, high: 100.0"))


def children_of_the_search():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    found = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")
    return [r for r in found if "mlflow.parentRunId" in r.data.tags]


def test_diverged_trials_fail_and_can_be_neither_ranked_nor_promoted(workdir, tiny_dir, capsys):
    (workdir / "space.yaml").write_text(DIVERGING_SPACE)
    cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)])
    trials = children_of_the_search()
    assert len(trials) == 2
    client = MlflowClient()
    for trial in trials:
        tags = trial.data.tags
        assert tags["trial_state"] == "FAIL", tags.get("error")
        assert trial.info.status == "FAILED"
        assert tags["fail_reason"] in ("diverged", "no better than chance")
        assert tags["error"].startswith(tags["fail_reason"])
        assert "objective" not in trial.data.metrics
        assert not mlflow.search_logged_models(
            filter_string=f"source_run_id = '{trial.info.run_id}'", output_format="list")
        # the curves that show what went wrong are kept
        assert "plots/training_curves.png" in {
            a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    parent = client.get_run(trials[0].data.tags["mlflow.parentRunId"])
    assert registry.ranked_trials(client, parent) == []
    assert "best_run_id" not in parent.data.tags
    capsys.readouterr()

    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 2
    assert "no completed trial" in capsys.readouterr().err
    assert cli.main(["promote", "--run", trials[0].info.run_id, "--force",
                     "--data-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a failed run is never promoted" in err, err
    assert client.search_model_versions("name = 'digit-recognizer'") == []


def test_a_diverged_plain_run_ends_failed_with_one_line(workdir, tiny_dir, capsys):
    code = cli.main(["train", "--experiment", "basic_cnn", "--epochs", "2",
                     "--set", "optimizer.learning_rate=50", "--set", "model.blocks.0.filters=[8,16]",
                     "--set", "model.dense_units=[32]", "--data-dir", str(tiny_dir)])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2)  # a training failure, reported as such, not a traceback
    assert len(err.splitlines()) == 1, err
    assert "diverged" in err or "no better than chance" in err
    (run,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")
    assert run.info.run_id in err
    assert run.info.status == "FAILED"
    assert run.data.tags["fail_reason"] in ("diverged", "no better than chance")
    assert not mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")


def make_result(history, probabilities, labels, diverged=False):
    from digitlab import config, train
    from digitlab.data import Split

    empty = np.zeros((0, 28, 28, 1), dtype=np.float32)
    return train.Result(
        config=config.load_experiment("basic_cnn"), model=None,
        split=Split(empty, labels[:0], empty, labels), history=history,
        val_probabilities=np.asarray(probabilities, dtype=np.float32), holdout_probabilities=None,
        holdout_accuracy=None, train_seconds=1.0, precision="float32", diverged=diverged,
    )


LABELS = np.repeat(np.arange(10), 3)  # 30 validation images, 3 per digit, as on tiny data


def test_a_loss_ten_times_its_first_epoch_is_divergence(workdir):
    right = np.eye(10)[LABELS] * 0.9 + 0.01  # a good model, confident and right
    exploded = make_result({"loss": [0.5, 0.3, 8.0]}, right, LABELS)
    assert exploded.failure.reason == "diverged"
    assert "rose from 0.5 in epoch 1 to 8 in epoch 3" in exploded.failure.message
    assert make_result({"loss": [0.5, 0.3, 4.0]}, right, LABELS).failure is None
    nan = make_result({"loss": [0.5, float("nan")]}, right, LABELS, diverged=True)
    assert nan.failure.reason == "diverged" and "non-finite at epoch 2" in nan.failure.message


def test_chance_is_judged_on_labels_and_probabilities(workdir):
    history = {"loss": [2.3, 2.2]}
    # confidently wrong: everything is called a 3 (what a diverged network answers)
    constant = make_result(history, np.eye(10)[np.full(30, 3)], LABELS)
    assert constant.failure.reason == "no better than chance"
    # a uniform guess: learnt nothing
    assert make_result(history, np.full((30, 10), 0.1), LABELS).failure.reason == \
        "no better than chance"
    # still learning: right only 6 times in 30, but the right digit already gets more than 1/10
    slow = np.full((30, 10), 0.09)
    slow[np.arange(30), LABELS] = 0.19
    slow[np.arange(30), (LABELS + 1) % 10] = 0.2
    slow[:6] = np.eye(10)[LABELS[:6]] * 0.5 + 0.05
    assert make_result(history, slow, LABELS).failure is None
    # clearly above chance, however poor its probabilities
    better = np.eye(10)[np.where(np.arange(30) < 12, LABELS, (LABELS + 1) % 10)]
    assert make_result(history, better, LABELS).failure is None


# --- data that cannot be split, or only half valid ------------------------------------------


def kaggle_dir(root: Path, per_class: int, classes=range(10), test: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(list(classes)), per_class)
    train = np.column_stack([labels, rng.integers(0, 256, (len(labels), 784))])
    root.mkdir(parents=True)
    data.write_int_csv(root / "train.csv", data.TRAIN_HEADER, train)
    if test is None:
        data.write_int_csv(root / "test.csv", data.PIXEL_COLUMNS, rng.integers(0, 256, (4, 784)))
    elif test != "missing":
        (root / "test.csv").write_text(test)
    return root


def test_one_image_per_class_is_a_one_line_error(workdir, capsys):
    d = kaggle_dir(workdir / "one-each", per_class=1)
    with pytest.raises(DataError, match="digit 0 has 1 training image and the validation split"):
        data.check_split(data.load(d), 0.1)
    shutil.rmtree(d / data.CACHE_DIR_NAME)  # what loading without a check wrote
    for command in (["train", "--experiment", "dnn", "--epochs", "1"], ["compare", "--experiments", "dnn"],
                    ["search", "--space", "quick"], ["search", "--space", "quick", "--folds", "3"]):
        code = cli.main([*command, "--data-dir", str(d)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1 and ("leaving none to train on" in err or "3-fold" in err), err
        assert not (workdir / "mlflow.db").exists()  # refused before any run was opened
        # and nothing written into the user's data folder: only their own files
        assert sorted(p.name for p in d.iterdir()) == ["test.csv", "train.csv"], command


def test_an_unknown_run_id_is_one_line(workdir, tiny_dir, capsys):
    from digitlab import store

    store.configure()
    for option in ("--run", "--search-run"):
        code = cli.main(["promote", option, "0123456789abcdef0123456789abcdef", "--force",
                         "--data-dir", str(tiny_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "0123456789abcdef0123456789abcdef" in err
        assert f"{option} 0123456789abcdef0123456789abcdef: no such run in the tracking store sqlite:///" in err


def test_promote_and_submit_print_only_their_own_lines(workdir, tiny_dir):
    """Output to a file, as in a log: no library warning, escape code or download bar, on
    success or on refusal."""
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 1"))
    digitlab = [sys.executable, "-m", "digitlab"]

    def run(*args: str) -> tuple[int, list[str]]:
        with open(workdir / "out.log", "w") as log:
            code = subprocess.run([*digitlab, *args, "--data-dir", str(tiny_dir)], cwd=workdir,
                                  stdout=log, stderr=subprocess.STDOUT).returncode
        return code, (workdir / "out.log").read_text().splitlines()

    assert run("search", "--space", "space.yaml")[0] == 0
    for args, lines in ((["promote"], 2), (["submit"], 3), (["promote", "--run", "f" * 32], 1)):
        code, out = run(*args)
        assert code == (2 if "--run" in args else 0), out
        ours = [line for line in out if line.strip() and "predicting test.csv" not in line]
        assert len(ours) == lines, out  # besides submit's own progress bar
        assert not [line for line in out if "Warning" in line or "\x1b[" in line
                    or "Downloading artifacts" in line], out


def test_a_study_whose_every_trial_failed_exits_non_zero(workdir, tiny_dir, capsys):
    # learning rates that make every trial diverge, fewer trials than stop a search early
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 2").replace(
        "max_consecutive_failures: 2", "max_consecutive_failures: 3").replace(
        "low: 1.0e-3, high: 1.0e-2", "low: 1.0e+6, high: 1.0e+7"))
    code = cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "promote" not in out
    assert "no trial completed (2 FAIL); most failed trials: " in err and "(2 of 2)" in err


def test_two_images_per_class_split(workdir):
    loaded = data.load(kaggle_dir(workdir / "two-each", per_class=2))
    data.check_split(loaded, 0.1)
    split = data.split(loaded, 0.1, seed=0)
    assert sorted(split.train_labels.tolist()) == sorted(split.val_labels.tolist()) == list(range(10))
    with pytest.raises(DataError, match="digit 0 has 2 training images"):
        data.check_split(loaded, 0.9)  # round(1.8) = 2 of 2 to validation


def test_a_digit_missing_from_train_csv_is_warned_about(workdir):
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("digitlab.data")
    logger.addHandler(handler)
    try:
        data.load(kaggle_dir(workdir / "no-seven", per_class=3, classes=[c for c in range(10) if c != 7]))
        assert [r.getMessage() for r in seen if "digit 7" in r.getMessage()], seen
        seen.clear()
        data.load(kaggle_dir(workdir / "all", per_class=3))
        assert seen == []
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("test", "message"), [
    ("missing", "test.csv: file not found"),
    (",".join(data.TRAIN_HEADER) + "\n" + ",".join(["1"] * 785) + "\n",
     "test.csv: line 1, column label: test.csv must not have a label column"),
])
def test_a_bad_test_csv_leaves_no_cache_of_train_csv(workdir, capsys, test, message):
    d = kaggle_dir(workdir / "half", per_class=3, test=test)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert cli.main(["data", "--data-dir", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (d / data.CACHE_DIR_NAME).exists()
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


# --- submissions -------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["1000000000000000", "10" + "0" * 30])
def test_score_names_an_out_of_range_image_id(tmp_path, capsys, image_id):
    (tmp_path / "solution.csv").write_text("ImageId,Label\n1,3\n2,5\n3,0\n")
    (tmp_path / "sub.csv").write_text(f"ImageId,Label\n1,3\n{image_id},5\n3,0\n")
    assert cli.main(["score", str(tmp_path / "sub.csv"), str(tmp_path / "solution.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "sub.csv: line 3, column ImageId:" in err and "is outside 1..3" in err


def test_writing_a_submission_removes_what_killed_writers_left(tmp_path):
    path = tmp_path / "submission.csv"
    # what a writer killed between creating its temporary file and renaming it leaves
    stale = tmp_path / ".submission.csv.k1ll3d.tmp"
    stale.write_text("ImageId,Label\n1,")
    old = time.time() - 2 * osutil.STALE_TEMPORARY_SECONDS
    os.utime(stale, (old, old))
    in_progress = tmp_path / ".submission.csv.wr1t1ng.tmp"  # another writer, busy right now
    in_progress.write_text("ImageId,Label\n")
    other = tmp_path / ".other.csv.k1ll3d.tmp"  # not this file's
    other.write_text("")
    os.utime(other, (old, old))
    submission.write(np.array([1, 2, 3]), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.csv.k1ll3d.tmp", ".submission.csv.wr1t1ng.tmp", "submission.csv"]


def test_a_submit_after_a_killed_submit_leaves_no_temporary_file(tmp_path):
    """kill -9 between writing the temporary file and renaming it; the next write into the
    folder, a moment later, removes what the dead writer left."""
    path = tmp_path / "submission.csv"
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys; from pathlib import Path; from digitlab import osutil; "
         "osutil.atomic_write(Path(sys.argv[1]), 'ImageId,Label\\n1,', "
         "check=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))", str(path)])
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".submission.csv.") and left.name.endswith(".tmp")
    submission.write(np.array([1, 2, 3]), path)
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# --- the tracking server's process tree ---------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int, int, str] | None:
    """(state, ppid, pgrp, session, start time) of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), fields[19]


def all_processes() -> dict[int, tuple]:
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (stat := proc_stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def tree_of(root: int) -> dict[int, tuple]:
    """The process and its descendants, and every process sharing a group or session with one."""
    procs = all_processes()
    tree = {root} if root in procs else set()
    while True:
        more = {pid for pid, s in procs.items() if s[1] in tree} - tree
        if not more:
            break
        tree |= more
    groups = {procs[p][2] for p in tree} | {procs[p][3] for p in tree}
    return {pid: s for pid, s in procs.items()
            if pid in tree or s[2] in groups or s[3] in groups}




def leftovers(tree: dict[int, tuple]) -> dict[int, tuple]:
    """Live processes of the recorded tree, or of its groups and sessions."""
    groups = {s[2] for s in tree.values()} | {s[3] for s in tree.values()}
    return {pid: s for pid, s in all_processes().items() if s[0] != "Z" and (
        (pid in tree and tree[pid][4] == s[4]) or s[2] in groups or s[3] in groups)}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_whole_server_tree(tmp_path):
    port = free_port()
    digitlab = str(Path(sys.executable).parent / "digitlab")
    server = subprocess.Popen(
        [digitlab, "server", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own session: the test's processes stay out of it
    )
    tree = {}
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        time.sleep(2)  # the job runner starts its consumers beside the web workers
        tree = tree_of(server.pid)
        assert len(tree) > 2, tree  # the server's workers and consumers are in it
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        # When `digitlab server` has exited, its tree is gone: not exiting some time later.
        left = leftovers(tree)
        assert not left, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in left}
    finally:
        tree.update(tree_of(server.pid))
        for pid in leftovers(tree):  # whatever a failure left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if server.poll() is None:
            server.kill()


# --- values that pass a range check but are not numbers a run can use ------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "1e999"])
def test_non_finite_config_floats_are_one_line_errors(workdir, tiny_dir, capsys, value):
    code = cli.main(["train", "--experiment", "dnn", "--data-dir", str(tiny_dir),
                     "--set", f"optimizer.learning_rate={value}"])
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "optimizer.learning_rate" in line and "is not a finite number" in line
    assert not (workdir / "mlflow.db").exists()


def test_non_finite_search_bounds_are_rejected(workdir, tiny_dir, capsys):
    path = workdir / "inf.yaml"
    path.write_text(TINY_SPACE.replace("high: 1.0e-2", "high: .inf"))
    assert cli.main(["search", "--space", str(path), "--data-dir", str(tiny_dir)]) == 2
    assert "low and high must be finite numbers" in capsys.readouterr().err
    assert not (workdir / "optuna.journal").exists()


def test_epochs_option_does_not_hide_a_bad_override(workdir, tiny_dir, capsys):
    """--epochs is applied after --set, so a bad --set value is still checked."""
    code = cli.main(["train", "--experiment", "dnn", "--epochs", "1", "--data-dir", str(tiny_dir),
                     "--set", "training.epochs=abc"])
    assert code == 2
    assert "training.epochs: expected int, got 'abc'" in capsys.readouterr().err
    assert not (workdir / "mlflow.db").exists()


def test_command_line_budget_meets_the_search_file_checks(workdir, tiny_dir, capsys):
    """--max-epochs replaces the file's budget before the checks: min_epochs 2 with
    --max-epochs 1 is rejected as the same values in the file are."""
    path = workdir / "budget.yaml"
    path.write_text(TINY_SPACE.replace("pruner: none", "pruner: median, min_epochs: 2"))
    assert cli.main(["search", "--space", str(path), "--max-epochs", "1",
                     "--data-dir", str(tiny_dir)]) == 2
    assert "optuna.min_epochs must be an integer from 1 to budget.max_epochs" in capsys.readouterr().err
    assert not (workdir / "optuna.journal").exists() and not (workdir / "mlflow.db").exists()
