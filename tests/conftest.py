"""Shared fixtures: tiny real data in Kaggle layout, and an isolated MLflow store per test."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Every experiment the repository ships, read from its folder (not a list kept by hand).
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def load_benchmark(path: str):
    """A script of benchmarks/ as a module, by its path there without `.py` ("common",
    "studies/recipes"): they run as files and are not installed."""
    if str(REPO / "benchmarks") not in sys.path:  # where the scripts find common.py
        sys.path.insert(0, str(REPO / "benchmarks"))
    file = REPO / "benchmarks" / f"{path}.py"
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def study_name(base: str, data_dir) -> str:
    """A default study's name on `data_dir`: on data other than the embedded demo's it ends
    in the data's short digest (`search.for_data`)."""
    from digitlab import data

    return f"{base}-{data.load(data_dir).digest[:8]}"


# A search that trains in seconds on `tiny_dir`: a narrow basic CNN, two knobs.
TINY_SPACE = """
experiments: [basic_cnn]
objective: {metric: val_accuracy, direction: maximize}
budget: {trials: 3, max_epochs: 2}
optuna: {sampler: tpe, pruner: none}
kerastuner: {tuner: random}
max_consecutive_failures: 2
fixed:
  model.blocks.0.filters: [8, 16]
  model.dense_units: [32]
space:
  model.dropout: {type: float, low: 0.1, high: 0.5}
  optimizer.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> Path:
    """The embedded default, written once per test session."""
    from digitlab import data

    return data.write_embedded(tmp_path_factory.mktemp("embedded") / "digit-recognizer")


@pytest.fixture(scope="session")
def tiny_dir(embedded_dir, tmp_path_factory) -> Path:
    """300 training rows (30 per class) and 50 test rows with solution: real digits, fast."""
    from digitlab import data

    full = data.load_kaggle_dir(embedded_dir)
    out = tmp_path_factory.mktemp("tiny") / "digit-recognizer"
    out.mkdir()
    rng = np.random.default_rng(0)
    train_idx = np.concatenate(
        [rng.choice(np.flatnonzero(full.train_labels == c), 30, replace=False) for c in range(10)]
    )
    train_idx = rng.permutation(train_idx)
    pixels = np.rint(full.train_images[train_idx].reshape(-1, 784) * 255).astype(int)
    data.write_int_csv(out / "train.csv", data.TRAIN_HEADER,
                        np.column_stack([full.train_labels[train_idx], pixels]))
    test_pixels = np.rint(full.test_images[:50].reshape(-1, 784) * 255).astype(int)
    data.write_int_csv(out / "test.csv", data.PIXEL_COLUMNS, test_pixels)
    data.write_int_csv(out / "solution.csv", data.SOLUTION_HEADER,
                        np.column_stack([np.arange(1, 51), full.test_labels[:50]]))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory, as a user's own folder is: no experiments/, search/ or
    registry/ (the shipped copies are found), and its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# --- servers the distributed tests start -------------------------------------------

PG = os.environ.get("DIGITLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture(scope="session")
def postgres() -> str:
    """The server's URL; without one these tests skip with the reason, except under CI=true
    (CI starts PostgreSQL, so a skip there would hide a broken set-up)."""
    import psycopg

    try:
        with psycopg.connect(f"{PG}/postgres", connect_timeout=5):
            return PG
    except psycopg.OperationalError as exc:
        reason = (f"no PostgreSQL at {PG} (set DIGITLAB_TEST_PG): "
                  f"{str(exc).strip().splitlines()[0]}")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs PostgreSQL: {reason}")
        pytest.skip(reason)


@pytest.fixture
def database(postgres):
    """Makes a fresh PostgreSQL database per call (returns its URL), dropped afterwards."""
    import psycopg

    made = []

    def make() -> str:
        name = f"digitlab_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return f"{PG}/{name}"

    yield make
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as connection:
        for name in made:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path | None = None, seconds: int = 180) -> None:
    """Until the server at `url` answers /health; fails with its log if it exits or hangs."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            told = log.read_text()[-3000:] if log else ""
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}): {told}") from None
            if time.time() > deadline:
                raise AssertionError(f"{url} did not answer /health in {seconds} s: {told}") from None
            time.sleep(0.5)


def kill_during_trial(args: list[str], cwd: Path, marker: str, epoch_line: str = "val_accuracy:") -> None:
    """Start `digitlab -v ARGS`, SIGKILL it at the first Keras epoch line (one holding
    `epoch_line`) after the line that holds `marker` (-v prints a line per epoch), and check
    that it died of the signal."""
    import signal
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "digitlab", "-v", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    seen, started = [], False
    try:
        for line in proc.stdout:
            seen.append(line)
            started = started or marker in line
            if started and epoch_line in line:  # Keras's epoch line, not a summary
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
