"""Workers on separate hosts: Linux network namespaces stand in for machines.

Each "host" is a network namespace joined to this machine by a veth pair on a bridge of
its own, with an address in a private /24 that exists only on these test devices; the
namespaces have no other route, so nothing they send can leave the machine. On the host
side of the bridge run PostgreSQL (reached through a small TCP forwarder to
127.0.0.1:5432, its configuration untouched) and an authenticated `digitlab server` that
proxies artifacts. A worker shares nothing with the others but that network: its own
working directory, HOME, data copy and environment (tracking URI, credentials, storage
URL, worker host name).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from tests.conftest import PG, TINY_SPACE, free_port, wait_healthy

pytestmark = [pytest.mark.multihost, pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
IP = shutil.which("ip")
HOSTS = ("a", "b", "c")
# Small, so that a lost host is noticed within seconds.
HEARTBEAT_INTERVAL, HEARTBEAT_GRACE = 2, 10
PASSWORD = f"test-only-{secrets.token_hex(12)}"
AUTH_ENV = {"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
SPACE = TINY_SPACE.replace("sampler: tpe", "sampler: random")
TERMINAL = ("FINISHED", "KILLED", "FAILED")


def unavailable(reason: str):
    """Skip with the reason; under CI=true, where the set-up is provided, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs network namespaces: {reason}")
    pytest.skip(reason)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = [IP, "netns", "exec", ns, IP] if ns else [IP]
    proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}{f' (in {ns})' if ns else ''}: {proc.stderr.strip()}")
    return proc


# --- the network ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Whether namespaces, veth pairs and bridges can be made here (once per session)."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    if IP is None:
        unavailable("no `ip` command (iproute2)")
    probe = f"dl-probe-{secrets.token_hex(3)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        unavailable(f"`ip netns add` fails: {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)
    bridge = f"dlp{secrets.token_hex(3)}"
    made = ip("link", "add", bridge, "type", "bridge", check=False)
    if made.returncode != 0:
        unavailable(f"`ip link add type bridge` fails: {made.stderr.strip()}")
    ip("link", "del", bridge, check=False)


def unused_prefix() -> str:
    """A 10.213.x /24 that no address or route of this machine touches."""
    taken = ip("-o", "-4", "addr").stdout + ip("-4", "route").stdout
    for x in secrets.SystemRandom().sample(range(1, 255), 254):
        prefix = f"10.213.{x}"
        if f"{prefix}." not in taken:
            return prefix
    unavailable("no free /24 in 10.213.0.0/16")


class Forwarder:
    """Forwards TCP connections from (listen_ip, a free port) to `target`, in threads."""

    def __init__(self, listen_ip: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_ip, 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.stopping = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        other = {a: b, b: a}
        with selectors.DefaultSelector() as selector:
            for s in (a, b):
                s.settimeout(10)
                selector.register(s, selectors.EVENT_READ)
            try:
                while not self.stopping.is_set():
                    for key, _ in selector.select(timeout=0.5):
                        data = key.fileobj.recv(65536)
                        if not data:  # one side closed: so does the other
                            return
                        other[key.fileobj].sendall(data)
            except OSError:
                return
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()
                with self.lock:
                    self.sockets -= {a, b}

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(timeout=5)


@dataclass
class Lan:
    tag: str
    prefix: str
    bridge: str
    host_ip: str  # this machine, on the bridge: where the servers listen
    namespaces: dict[str, str] = field(default_factory=dict)  # host name -> namespace
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # host -> (our end, its end)
    addresses: dict[str, str] = field(default_factory=dict)

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process of the host's namespace, until none is left."""
        ns, killed = self.namespaces[host], []
        for _ in range(50):
            pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                return killed
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += pids
            time.sleep(0.2)
        raise AssertionError(f"processes of {ns} outlive SIGKILL")

    def unplug(self, host: str) -> None:
        ip("link", "set", self.links[host][0], "down")


def make_lan(stack: contextlib.ExitStack) -> Lan:
    tag = secrets.token_hex(3)
    prefix = unused_prefix()
    lan = Lan(tag=tag, prefix=prefix, bridge=f"dl{tag}br", host_ip=f"{prefix}.1")
    ip("link", "add", lan.bridge, "type", "bridge")
    stack.callback(ip, "link", "del", lan.bridge, check=False)
    ip("link", "set", lan.bridge, "addrgenmode", "none", check=False)  # no IPv6 chatter
    ip("addr", "add", f"{lan.host_ip}/24", "dev", lan.bridge)
    ip("link", "set", lan.bridge, "up")
    for i, host in enumerate(HOSTS):
        ns, ours, theirs = f"dl-{tag}-{host}", f"dl{tag}h{host}", f"dl{tag}n{host}"
        ip("netns", "add", ns)
        stack.callback(ip, "netns", "del", ns, check=False)
        stack.callback(lan.kill_host, host)  # runs first: nothing of the host outlives the test
        lan.namespaces[host] = ns
        ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        stack.callback(ip, "link", "del", ours, check=False)
        ip("link", "set", theirs, "netns", ns)
        lan.links[host] = (ours, theirs)
        lan.addresses[host] = f"{prefix}.{10 + i}"
        for dev, where in ((ours, None), (theirs, ns)):
            ip("link", "set", dev, "addrgenmode", "none", ns=where, check=False)
        ip("link", "set", ours, "master", lan.bridge)
        ip("link", "set", ours, "up")
        ip("link", "set", "lo", "up", ns=ns)
        ip("addr", "add", f"{lan.addresses[host]}/24", "dev", theirs, ns=ns)
        ip("link", "set", theirs, "up", ns=ns)
    for host in HOSTS if shutil.which("ping") else ():  # each host reaches this machine
        ok = subprocess.run([IP, "netns", "exec", lan.namespaces[host], "ping", "-c", "1", "-W", "2",
                             "-w", "10", lan.host_ip], capture_output=True, text=True, timeout=30)
        if ok.returncode != 0:
            raise AssertionError(f"host {host} cannot reach {lan.host_ip}: {ok.stdout} {ok.stderr}")
    return lan






@dataclass
class Cluster:
    lan: Lan
    root: Path
    tracking_uri: str
    storage: str  # as the hosts see it
    storage_port: int  # the forwarder's
    local_storage: str  # as this process sees it
    artifacts: Path
    data: Path  # the data every host gets a copy of
    space: str = SPACE

    def host_dir(self, host: str) -> Path:
        d = self.root / f"host-{host}"
        if not d.exists():
            (d / "home").mkdir(parents=True)
            (d / "tmp").mkdir()
            (d / "space.yaml").write_text(self.space)
            shutil.copytree(self.data, d / "data" / "digit-recognizer")
        return d

    def env(self, host: str, **extra: str) -> dict:
        """A host's whole environment: of this process's, only PATH, the backend and TZ."""
        d = self.host_dir(host)
        env = {
            "PATH": f"{BIN}{os.pathsep}/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(d / "home"), "TMPDIR": str(d / "tmp"), "LANG": "C.UTF-8",
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DIGITLAB_WORKER_HOST": f"host-{host}",
            "DIGITLAB_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
            "DIGITLAB_HEARTBEAT_GRACE": str(HEARTBEAT_GRACE),
        }
        for name in ("KERAS_BACKEND", "TZ"):  # the same backend; clocks read alike (trial times)
            if name in os.environ:
                env[name] = os.environ[name]
        return {**env, **extra}

    def command(self, host: str, *args: str) -> list[str]:
        return [IP, "netns", "exec", self.lan.namespaces[host], str(BIN / "digitlab"), *args]

    def search(self, host: str, *args: str) -> list[str]:
        return self.command(host, "search", "--space", "space.yaml", "--storage", self.storage,
                            "--data-dir", "data/digit-recognizer", *args)

    def start(self, host: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        d = self.host_dir(host)
        log = d / "worker.log"
        proc = subprocess.Popen(args, cwd=d, env=self.env(host), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, text=True)
        return proc, log

    def run(self, host: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.host_dir(host), env=self.env(host), capture_output=True,
                              text=True, timeout=timeout)

    def client(self, monkeypatch) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        return MlflowClient(tracking_uri=self.tracking_uri)


@pytest.fixture
def cluster(netns_available, database, tmp_path, tiny_dir):
    """Three hosts (a, b, c) on a bridge; PostgreSQL and an authenticated tracking server on
    this machine's side of it. Everything is torn down, processes first, even on failure."""
    with contextlib.ExitStack() as stack:
        lan = make_lan(stack)
        pg = urllib.parse.urlsplit(PG)
        forwarder = Forwarder(lan.host_ip, (pg.hostname or "127.0.0.1", pg.port or 5432))
        stack.callback(forwarder.stop)
        pg_user = pg.netloc.rsplit("@", 1)[0] if "@" in pg.netloc else ""
        optuna_db, mlflow_db, auth_db = (database().rsplit("/", 1)[1] for _ in range(3))

        port = free_port(lan.host_ip)
        server_dir = tmp_path / "tracking-host"
        server_dir.mkdir()
        artifacts = server_dir / "artifacts"
        log = server_dir / "server.log"
        server = subprocess.Popen(
            [str(BIN / "digitlab"), "server", "--host", lan.host_ip, "--port", str(port),
             "--backend-store-uri", f"{PG.replace('postgresql://', 'postgresql+psycopg2://')}/{mlflow_db}",
             "--artifacts-destination", str(artifacts), "--auth-db-uri", f"{PG}/{auth_db}",
             "--allowed-hosts", f"{lan.host_ip}:{port}"],
            cwd=server_dir, env={**os.environ, **AUTH_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        )

        def stop_server() -> None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)

        stack.callback(stop_server)
        tracking_uri = f"http://{lan.host_ip}:{port}"
        wait_healthy(tracking_uri, server, log)
        yield Cluster(
            lan=lan, root=tmp_path, tracking_uri=tracking_uri,
            storage=f"postgresql://{pg_user}{'@' if pg_user else ''}{lan.host_ip}:{forwarder.port}/{optuna_db}",
            storage_port=forwarder.port, local_storage=f"{PG}/{optuna_db}", artifacts=artifacts, data=tiny_dir,
        )


def wait_all(procs: list[subprocess.Popen], seconds: int) -> None:
    deadline = time.time() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


def trial_rows(storage: str, study: str) -> list[dict]:
    """Optuna's trials of a study, read straight from its tables: number, state, user
    attributes, start time, heartbeat or not, epochs reported ([] while there are none)."""
    import json

    try:
        with psycopg.connect(storage, connect_timeout=5) as connection:
            trials = connection.execute(
                "SELECT t.trial_id, t.number, t.state::text, t.datetime_start FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = %s ORDER BY t.number",
                (study,)).fetchall()
            attrs = connection.execute(
                "SELECT trial_id, key, value_json FROM trial_user_attributes").fetchall()
            beats = {row[0] for row in connection.execute("SELECT trial_id FROM trial_heartbeats")}
            epochs = dict(connection.execute(
                "SELECT trial_id, count(*) FROM trial_intermediate_values GROUP BY trial_id").fetchall())
    except psycopg.errors.UndefinedTable:
        return []
    rows = []
    for trial_id, number, state, start in trials:
        user = {k: json.loads(v) for t, k, v in attrs if t == trial_id}
        rows.append({"number": number, "state": state, "attrs": user, "start": start,
                     "heartbeat": trial_id in beats, "epochs": epochs.get(trial_id, 0)})
    return rows


def search_runs(client: MlflowClient) -> tuple[list, list]:
    experiment = client.get_experiment_by_name("digit-recognizer")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "search_study" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


# --- the tests --------------------------------------------------------------------------


def test_one_search_spread_over_two_hosts(cluster, monkeypatch):
    """Two hosts share one study's budget and parent run; every artifact reaches the server;
    a third host promotes and submits with nothing but the tracking URI and credentials."""
    workers = [cluster.start(host, cluster.search(host, "--study", "spread", "--trials", "3",
                                                  "--max-epochs", "1"))
               for host in ("a", "b")]
    wait_all([w for w, _ in workers], 600)
    for (proc, log), host in zip(workers, ("a", "b"), strict=True):
        assert proc.returncode == 0, f"host {host}:\n{tail(log)}"
        d = cluster.host_dir(host)  # everything went to the servers, nothing stayed local
        assert not (d / "mlruns").exists() and not (d / "mlflow.db").exists()

    trials = trial_rows(cluster.local_storage, "spread")
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3  # the budget, shared, not per host
    assert {t["attrs"]["worker"].split(":")[0] for t in trials} == {"host-a", "host-b"}

    client = cluster.client(monkeypatch)
    parents, children = search_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id for c in children} == {t["attrs"]["mlflow_run_id"] for t in trials}
    for child in children:  # stored by the server, in its artifacts directory on this machine
        assert child.info.artifact_uri.startswith("mlflow-artifacts:"), child.info.artifact_uri
        run_dir = cluster.artifacts / child.info.experiment_id / child.info.run_id / "artifacts"
        plots = {p.name for p in (run_dir / "plots").glob("*.png")}
        assert {"training_curves.png", "confusion_matrix.png"} <= plots, sorted(run_dir.rglob("*"))
        models = client.search_logged_models([child.info.experiment_id],
                                             filter_string=f"source_run_id = '{child.info.run_id}'")
        assert len(models) == 1 and models[0].artifact_location.startswith("mlflow-artifacts:")
        model_dir = cluster.artifacts / models[0].artifact_location.split("/", 1)[1].lstrip("/")
        assert list(model_dir.rglob("*.keras")), sorted(model_dir.rglob("*"))

    promote = cluster.run("c", cluster.command("c", "promote", "--data-dir", "data/digit-recognizer"))
    assert promote.returncode == 0, promote.stderr[-3000:]
    assert "is now production" in promote.stdout
    submit = cluster.run("c", cluster.command("c", "submit", "--data-dir", "data/digit-recognizer"))
    assert submit.returncode == 0, submit.stderr[-3000:]
    lines = (cluster.host_dir("c") / "submissions" / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 51
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    assert version.tags["search_run_id"] == parents[0].info.run_id
    assert version.tags["members"] in {c.info.run_id for c in children}


def test_a_lost_host_is_retried_on_another(cluster, monkeypatch):
    """Host A dies in the middle of a trial (every process killed, its link down); host B
    retries that trial once the heartbeats are overdue, and the study completes."""
    workers = {host: cluster.start(host, cluster.search(host, "--study", "lost", "--trials", "3"))
               for host in ("a", "b")}
    try:
        deadline, victim = time.time() + 300, None
        while victim is None and time.time() < deadline:
            for t in trial_rows(cluster.local_storage, "lost"):
                # training, its heartbeat recorded, and an epoch still to go: not about to end
                if (t["state"] == "RUNNING" and t["heartbeat"] and "mlflow_run_id" in t["attrs"]
                        and t["epochs"] == 0 and str(t["attrs"].get("worker", "")).startswith("host-a:")):
                    victim = t
            for host, (proc, log) in workers.items():
                assert proc.poll() is None, f"host {host} ended early:\n{tail(log)}"
            time.sleep(0.5)
        assert victim, f"no trial ran on host a:\n{tail(workers['a'][1])}"
        killed_at = datetime.datetime.now()
        assert cluster.lan.kill_host("a")
        cluster.lan.unplug("a")
        assert workers["a"][0].wait(timeout=30) == -signal.SIGKILL
        wait_all([workers["b"][0]], 600)
    finally:
        for proc, _ in workers.values():
            proc.kill()
    assert workers["b"][0].returncode == 0, tail(workers["b"][1])

    trials = trial_rows(cluster.local_storage, "lost")
    by_number = {t["number"]: t for t in trials}
    lost = by_number[victim["number"]]
    assert lost["state"] == "FAIL" and "fail_reason" not in lost["attrs"]  # died, not failed
    retries = [t for t in trials if t["attrs"].get("retry_of") == victim["number"]]
    assert len(retries) == 1, trials
    retry = retries[0]
    assert retry["state"] == "COMPLETE" and retry["attrs"]["worker"].startswith("host-b:")
    # found by its missing heartbeats: not before the grace period after the last one
    assert retry["start"] >= killed_at + datetime.timedelta(seconds=HEARTBEAT_GRACE - HEARTBEAT_INTERVAL - 1)
    assert sum(t["state"] == "COMPLETE" for t in trials) == 3 and len(trials) == 4

    parents, children = search_runs(cluster.client(monkeypatch))
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len(children) == len(trials)  # one run per trial, each ended
    assert all(c.info.status in TERMINAL for c in children), [c.info.status for c in children]
    killed = [c for c in children if c.info.status == "KILLED"]
    assert [c.info.run_id for c in killed] == [victim["attrs"]["mlflow_run_id"]]
    assert killed[0].data.tags["trial_state"] == "FAIL"


def test_a_host_that_cannot_reach_the_servers_fails_fast(cluster):
    """A host whose link is down cannot reach the tracking server; a host whose storage
    accepts connections but never answers cannot reach the Optuna storage. Either worker
    stops with exit status 2 and one line that names what it cannot reach."""
    ip("link", "set", cluster.lan.links["c"][1], "down", ns=cluster.lan.namespaces["c"])
    proc = cluster.run("c", cluster.search("c", "--study", "nowhere"), timeout=90)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the MLflow tracking server" in lines[0], lines

    # a storage that takes the connection and then says nothing, as a hung database would
    with socket.create_server((cluster.lan.host_ip, 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        storage = cluster.storage.replace(f":{cluster.storage_port}/", f":{port}/")
        args = cluster.command("b", "search", "--space", "space.yaml", "--storage", storage,
                               "--data-dir", "data/digit-recognizer", "--study", "silent")
        proc = cluster.run("b", args, timeout=90)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Optuna storage" in lines[0], lines
    assert PASSWORD not in proc.stderr
