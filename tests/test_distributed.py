"""Scale-out against the real thing: PostgreSQL on 127.0.0.1 and `mlflow server` on a free
loopback port. Each worker acts as its own machine (own working directory, own worker
host name), so a dead worker is found by its missing heartbeats, as across machines."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_SPACE, free_port, wait_healthy

pytestmark = pytest.mark.distributed

SPACE = TINY_SPACE.replace("trials: 3, max_epochs: 2", "trials: 4, max_epochs: 3").replace("sampler: tpe", "sampler: random")
BIN = Path(sys.executable).parent










def start_server(tmp_path: Path, backend: str, *extra: str, env: dict | None = None):
    port = free_port()
    # the server logs every request: to a file, since an unread pipe fills up and blocks it
    log = tmp_path / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "digitlab", "server", "--port", str(port), "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "server-artifacts"), *extra],
        cwd=tmp_path, env={**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def tracking_server(tmp_path, database):
    url, proc = start_server(tmp_path, database().replace("postgresql://", "postgresql+psycopg2://"))
    yield url
    stop(proc)


def worker_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "space.yaml").write_text(SPACE)
    return d


@pytest.mark.slow
def test_three_workers_on_two_machines_worth_of_failure(tmp_path, tiny_dir, database, tracking_server):
    storage = database()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server, "DIGITLAB_HEARTBEAT_INTERVAL": "1",
           "DIGITLAB_HEARTBEAT_GRACE": "6"}
    args = [sys.executable, "-m", "digitlab", "-v", "search", "--space", "space.yaml", "--storage", storage,
            "--study", "dist", "--data-dir", str(tiny_dir)]
    workers = []
    for i in range(3):
        d = worker_dir(tmp_path, f"machine{i}")
        workers.append(subprocess.Popen(args, cwd=d, env={**env, "DIGITLAB_WORKER_HOST": f"machine{i}"},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    watchdog = threading.Timer(600, lambda: [w.kill() for w in workers])
    watchdog.start()
    try:
        victim, seen, started = workers[0], [], False
        for line in victim.stdout:  # SIGKILL the first worker in the middle of a trial
            seen.append(line)
            started = started or re.search(r"\btrial \d+: ", line) is not None
            if started and "val_accuracy" in line:
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
        outputs = [w.communicate(timeout=600)[0] for w in workers[1:]]
    finally:
        watchdog.cancel()
        for w in workers:
            w.kill()
    for w, out in zip(workers[1:], outputs, strict=True):
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="dist", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4, states  # the budget, shared and not multiplied
    interrupted = [t for t in study.trials
                   if t.state.name == "FAIL" and t.user_attrs.get("fail_reason", "interrupted") == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["worker"].startswith("machine0:")
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retried) == 1 and retried[0].params == interrupted[0].params

    mlflow.set_tracking_uri(tracking_server)
    runs = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "search_study" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len(children) == len(study.trials)  # one MLflow run per trial
    assert all(c.info.status in ("FINISHED", "KILLED", "FAILED") for c in children)
    killed = [c for c in children if c.info.status == "KILLED"]
    assert [c.info.run_id for c in killed] == [interrupted[0].user_attrs["mlflow_run_id"]]
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id

    # the best model is promotable through the server, and a submission is written from it
    d = tmp_path / "machine1"
    promote = subprocess.run([sys.executable, "-m", "digitlab", "promote", "--data-dir", str(tiny_dir)],
                             cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert promote.returncode == 0, promote.stderr[-3000:]
    assert "is now production" in promote.stdout
    submit = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "digitlab", "submit",
                               "--data-dir", str(tiny_dir)], cwd=d, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = submit.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        submit.send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
        raise AssertionError(submit.communicate()[0][-6000:]) from None
    assert submit.returncode == 0, out[-3000:]
    lines = (d / "submissions" / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 51
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["last_submission_run_id"]
    # stored in the native Keras format, never pickled
    local = Path(mlflow.artifacts.download_artifacts(f"models:/digit-recognizer/{version.version}"))
    assert list(local.rglob("*.keras")) and not list(local.rglob("*.pkl"))


AUTH_ENV = {"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-only-secret-1", "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}


def test_unauthenticated_request_to_an_auth_server_gets_401(tmp_path, database):
    url, proc = start_server(tmp_path, database(), "--auth", "--auth-db-uri", database(), env=AUTH_ENV)
    try:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(search, timeout=10)
        assert denied.value.code == 401
        token = b64encode(f"admin:{AUTH_ENV['MLFLOW_AUTH_ADMIN_PASSWORD']}".encode()).decode()
        request = urllib.request.Request(search, headers={"Authorization": f"Basic {token}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-only-secret-1"}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
        ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}, "needs a password to create the admin user"),
        ({}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),  # both missing: both named, on one line
        ({}, "needs a password to create the admin user"),
        ({**AUTH_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "at least 12 characters"),
        ({**AUTH_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "insecure default password"),
    ],
)
def test_launcher_refuses_an_exposed_address_without_auth(tmp_path, env, message):
    """Binding beyond loopback turns auth on, and MLflow's own rules for it are one line."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}
    proc = subprocess.run([sys.executable, "-m", "digitlab", "server", "--host", "0.0.0.0"],
                          cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_unreachable_storage_or_server_fails_fast(workdir, tiny_dir):
    (workdir / "space.yaml").write_text(SPACE)
    base = [sys.executable, "-m", "digitlab", "search", "--space", "space.yaml", "--data-dir", str(tiny_dir)]
    start = time.time()
    proc = subprocess.run([*base, "--storage", f"postgresql://postgres@127.0.0.1:{free_port()}/none"],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach the Optuna storage" in proc.stderr, proc.stderr[-2000:]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.run(base, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach the MLflow tracking server" in proc.stderr, proc.stderr[-2000:]
    assert time.time() - start < 90
