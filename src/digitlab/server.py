"""`digitlab server`: an MLflow tracking server that is safe to share.

It runs `mlflow server` with a database backend store (PostgreSQL for teams,
SQLite for one user) and artifacts served through the server, bound to
127.0.0.1 unless told otherwise. Binding anywhere else turns on MLflow's
basic-auth app, whose own rules (an admin password, the server's secret key)
are checked before anything starts: an unauthenticated tracking server on a
network lets anyone read, write and delete runs and models.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digitlab import osutil
from digitlab.errors import UserError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wants_auth(host: str, auth: bool) -> bool:
    """Whether to run the basic-auth app: asked for, or forced by an address beyond this
    machine (never an unauthenticated tracking server on a network)."""
    return auth or not is_loopback(host)


def check_auth_settings() -> None:
    """MLflow's own checks of the auth settings (secret key, admin password), run here.

    `mlflow server` runs the same checks before it starts its workers, but a failure there
    is a traceback and exit status 1, one problem at a time; run first, in this process,
    every problem is named on one line, exit status 2. The rules themselves stay MLflow's.
    They run against a throw-away copy of the settings and user database, so that a
    refused server leaves no file behind; the server bootstraps its own.
    """
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        with osutil.environ(MLFLOW_AUTH_CONFIG_PATH=str(auth_config(Path(tmp), None))):
            from mlflow.exceptions import MlflowException
            from mlflow.server import auth as mlflow_auth
            from mlflow.server.auth.config import read_auth_config

            # The module reads its settings once, on import: point it at this copy.
            mlflow_auth.auth_config = read_auth_config()
            for check in (mlflow_auth.get_flask_server_secret_key, mlflow_auth.bootstrap_admin_user):
                try:
                    check()  # bootstrap: what `mlflow server` does first
                except MlflowException as exc:
                    problems.append(" ".join(exc.message.split()))
            with contextlib.suppress(Exception):
                mlflow_auth.store.engine.dispose()  # let go of the throw-away database
    if problems:
        raise UserError(" Also: ".join(problems))


def auth_config(state_dir: Path, auth_db_uri: str | None) -> Path:
    """MLflow's basic-auth settings: users in their own database, new users may only read."""
    state_dir.mkdir(parents=True, exist_ok=True)
    database = auth_db_uri or f"sqlite:///{(state_dir / 'basic_auth.db').resolve()}"
    path = state_dir / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def command(host: str, port: int, backend_store_uri: str, artifacts_destination: str,
            auth: bool, workers: int | None, allowed_hosts: str | None) -> list[str]:
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    args = [mlflow, "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination, "--serve-artifacts"]
    if auth:
        args += ["--app-name", "basic-auth"]
    if workers:
        args += ["--workers", str(workers)]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    return args


def serve(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str = "sqlite:///mlflow.db",
          artifacts_destination: str = "mlartifacts", auth: bool = False,
          auth_db_uri: str | None = None, workers: int | None = None,
          allowed_hosts: str | None = None, state_dir: str = ".mlflow-server") -> int:
    """Run the configured `mlflow server` until it stops; returns its exit status."""
    auth = wants_auth(host, auth)
    env = dict(os.environ)
    if auth:
        check_auth_settings()  # before anything is written
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(Path(state_dir), auth_db_uri).resolve())
    if "://" not in artifacts_destination:
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
        artifacts_destination = str(Path(artifacts_destination).resolve())
    args = command(host, port, backend_store_uri, artifacts_destination, auth, workers, allowed_hosts)
    print(f"starting: {' '.join(args)}" + (" (basic auth on)" if auth else ""), flush=True)
    return run_as_session(args, env)


# --- the server's process tree ---------------------------------------------------------
#
# `mlflow server` starts uvicorn (or gunicorn) with its workers and a job runner with its
# huey consumers, and on SIGTERM it exits without stopping the consumers: they outlive it,
# holding the store open. So the server runs as a child in a session of its own; a signal
# to this process goes to every process of that session, and whatever is still there when
# the server has exited is stopped too. (Within one session, because a process group is
# easily left: a session is only left by setsid, which none of them calls.)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long the processes get to shut down cleanly after a signal before they are killed.
STOP_GRACE_SECONDS = 10.0


def session_members(session: int) -> list[int]:
    """The live (not zombie) processes of a session, from /proc; [] where there is none."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def signal_session(session: int, signum: int) -> None:
    """Send `signum` to the session's process group and to any member that left the group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signum)
    for pid in session_members(session):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_session(session: int, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to what is left of the session, then SIGKILL to what outlives the grace time."""
    if not session_members(session):
        return
    signal_session(session, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while session_members(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_session(session, signal.SIGKILL)


def run_as_session(args: list[str], env: dict) -> int:
    """Run `args` as the leader of a new session until it exits; stop the session's other
    processes then. SIGTERM, SIGINT and SIGHUP are passed on to the whole session; a
    session that has not ended STOP_GRACE_SECONDS after one is killed."""
    child = subprocess.Popen(args, env=env, start_new_session=True)
    session = child.pid
    stopping_since: list[float] = []

    def forward(signum, frame):
        stopping_since.append(time.monotonic())
        signal_session(session, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping_since and time.monotonic() - stopping_since[0] > STOP_GRACE_SECONDS:
                    signal_session(session, signal.SIGKILL)
        stop_session(session)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # this process is failing: leave nothing behind
            signal_session(session, signal.SIGKILL)
            child.wait()
    return 128 - code if code < 0 else code
