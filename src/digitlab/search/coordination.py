"""What lets several processes and machines share one Optuna study: its storage, the
study lock, the heartbeats of running trials, and who owns a trial.

Storage: an Optuna journal file by default (`optuna.journal`: safe for several
processes on one machine, readable by optuna-dashboard), or any RDB URL
(`sqlite:///...`, `postgresql://...`), whose heartbeats let a worker on another
machine notice a dead one's trial.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna

from digitlab import osutil
from digitlab.errors import UserError

DEFAULT_STORAGE = "optuna.journal"


def is_rdb(url: str) -> bool:
    return "://" in url and not url.startswith("journal://")


def heartbeat_settings() -> tuple[int, int]:
    """Seconds between a running trial's heartbeats, and silence after which it is dead."""
    return (int(os.environ.get("DIGITLAB_HEARTBEAT_INTERVAL", "30")),
            int(os.environ.get("DIGITLAB_HEARTBEAT_GRACE", "120")))


def storage_for(url: str, on_stale_trial: Callable) -> optuna.storages.BaseStorage:
    """The study's storage; `on_stale_trial(study, trial)` runs for a trial whose worker
    stopped sending heartbeats (RDB storage only)."""
    if is_rdb(url):
        import sqlalchemy.exc

        interval, grace = heartbeat_settings()
        engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                    grace_period=grace, heartbeat_stale_trial_callback=on_stale_trial,
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together race to create the tables: the loser retries
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError) as exc:
                first = str(exc).strip().splitlines()[0]
                raise UserError(f"cannot reach the Optuna storage {redact(url)}: {first}") from None
    path = Path(url.removeprefix("journal://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def redact(url: str) -> str:
    """A storage URL without its password (a journal file path is returned as it is)."""
    if not is_rdb(url):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the given URL"


@contextlib.contextmanager
def study_lock(storage_url: str, storage, study_name: str):
    """One worker at a time in the study's critical sections (budget, parent run): a
    PostgreSQL advisory lock across machines, a file lock in the working directory on one."""
    if not storage_url.startswith("postgresql"):
        with osutil.file_lock(Path(f".digitlab-{study_name}.lock")):
            yield
        return
    import zlib

    import sqlalchemy

    key = zlib.crc32(f"digitlab:{study_name}".encode())
    with storage.engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()


@contextlib.contextmanager
def heartbeat(storage_url: str, storage, trial: optuna.Trial):
    """Record a running trial's heartbeat (RDB storage) so other machines see it alive.

    Optuna beats only inside `study.optimize`; trials here are asked and told by hand, and
    its storage API takes the internal trial id (`trial._trial_id`), which no public
    attribute of an asked trial gives."""
    if not is_rdb(storage_url):
        yield
        return
    stop = threading.Event()
    interval = heartbeat_settings()[0]

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
