"""The `digitlab` command as a user runs it: a subprocess, from a folder of their own."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from digitlab import cli
from tests.conftest import REPO

pytestmark = pytest.mark.subprocess

DIGITLAB = Path(sys.executable).parent / "digitlab"
# TensorFlow/absl C++ log lines ("I0000 00:00:... cudart_stub.cc:31] ...") and their preamble
LIBRARY_NOISE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)|oneDNN|cuInit|"
                           r"UserWarning|FutureWarning|INFO mlflow", re.M)


def digitlab(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # as a user's shell runs it: without the quiet settings that an in-process cli.main of
    # an earlier test put in this process's environment
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_LOGGING_LEVEL", "TF_CPP_MIN_LOG_LEVEL", "DIGITLAB_VERBOSE",
                        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "GRPC_VERBOSITY")}
    return subprocess.run([str(DIGITLAB), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture
def bad_dir(tiny_dir, tmp_path) -> Path:
    """Kaggle layout whose train.csv has a fractional pixel on line 3."""
    out = tmp_path / "bad"
    out.mkdir()
    lines = (tiny_dir / "train.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = "0.5"
    lines[2] = ",".join(cells)
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    (out / "test.csv").write_text((tiny_dir / "test.csv").read_text())
    return out


def test_bad_train_csv_is_one_line_exit_2_and_nothing_written(workdir, bad_dir):
    proc = digitlab(workdir, "train", "--experiment", "basic_cnn", "--data-dir", str(bad_dir))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"digitlab: error: {bad_dir / 'train.csv'}: line 3, column pixel4: '0.5' is not an integer"]
    assert sorted(p.name for p in workdir.iterdir()) == ["bad"]  # no mlflow.db, no cache
    assert not (bad_dir / ".digitlab-cache").exists()


def test_train_from_a_folder_without_config_folders_is_quiet(workdir, tiny_dir):
    assert not (workdir / "experiments").exists()
    proc = digitlab(workdir, "train", "--experiment", "basic_cnn", "--epochs", "1",
                    "--data-dir", str(tiny_dir), "--set", "model.blocks.0.filters=[8,16]",
                    "--set", "model.dense_units=[16]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not LIBRARY_NOISE.search(proc.stderr), proc.stderr[-3000:]
    assert "basic_cnn: best val_accuracy" in proc.stdout
    # before training: its length and the time it takes here, timed as a search's plan is
    assert re.fullmatch(r"basic_cnn: 1 epochs of one pass \(270 images, 1 passes over 270 training "
                        r"images\); about \d+ s here", proc.stdout.splitlines()[0]), proc.stdout[:500]
    assert "browse it with: digitlab ui, then http://127.0.0.1:5000/#/experiments/" in proc.stdout
    assert "mlflow ui" not in proc.stdout
    assert (workdir / "mlflow.db").is_file()


def test_verbose_shows_the_library_logs(workdir, tiny_dir):
    proc = digitlab(workdir, "train", "-v", "--experiment", "dnn", "--epochs", "1",
                    "--data-dir", str(tiny_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO mlflow" in proc.stderr  # e.g. the new store's "Creating initial MLflow database tables"


def test_unknown_experiment_lists_places_and_names(workdir):
    proc = digitlab(workdir, "train", "--experiment", "nope")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "experiment 'nope' not found" in line
    assert "experiments/nope.yaml" in line and "defaults/experiments/nope.yaml" in line
    assert "basic_cnn" in line and "kaggle_cnn_elastic" in line


def test_own_experiment_in_the_working_directory_wins(workdir):
    from digitlab import config

    (workdir / "experiments").mkdir()
    (workdir / "experiments" / "basic_cnn.yaml").write_text("model: {dense_units: [7]}\n")
    assert config.load_experiment("basic_cnn").model.dense_units == [7]
    assert config.load_experiment(str(REPO / "experiments" / "basic_cnn.yaml")).model.dense_units == [128]


def test_help_says_what_each_command_does_and_shows_defaults(workdir):
    top = digitlab(workdir, "--help").stdout
    assert "No logic lives here" not in top and "Digit Recognizer" in top
    search = " ".join(digitlab(workdir, "search", "--help").stdout.split())
    assert "(default: search/default.yaml)" in search and "-v, --verbose" in search
    assert "--engine {optuna,kerastuner}" in search  # choices where there are choices


def test_help_states_each_default_once():
    """No option's help says its default twice ("(0: the file's) (default: 0)") or shows a
    default that means nothing ("(default: None)", "(default: False)")."""
    import argparse

    from digitlab.cli_parser import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        for option in (a for a in command._actions if a.option_strings):
            help_text = command._get_formatter()._expand_help(option) if option.help else ""
            appended = help_text.count("(default: ")
            own = len(re.findall(r"\(0:|\(empty:|\bdefault\b",
                                 re.sub(r"\(default: [^)]*\)", "", help_text)))
            assert appended <= 1 and not (appended and own), \
                f"digitlab {name} {option.option_strings[-1]}: {help_text!r}"
        assert "(default: None)" not in text and "(default: False)" not in text, name
    bad = subprocess.run([str(DIGITLAB), "search", "--engine", "sklearn"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'sklearn'" in bad.stderr


def test_the_wheel_ships_the_config_folders(tmp_path):
    """A built wheel holds every experiment, search and registry file, and finds them when
    installed (unpacked here, without the checkout's links)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("digitlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("experiments", "search", "registry"):
        for path in (REPO / folder).glob("*.yaml"):
            assert f"digitlab/defaults/{folder}/{path.name}" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    found = subprocess.run(
        [sys.executable, "-c", "from digitlab import resources, registry; "
         "print(resources.find('search', 'search/default.yaml')); print(registry.policy().model_name)"],
        cwd=scratch, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    assert found == [str(tmp_path / "site" / "digitlab" / "defaults" / "search" / "default.yaml"),
                     "digit-recognizer"]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"digitlab {version('digitlab')}"
