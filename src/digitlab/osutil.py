"""File and process helpers that several modules share: atomic writes, file locks, and
temporary environment variables."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# A writer's temporary file lives for the moment of one write; one older than this was
# left by a writer that was killed. A temporary file names its writer (host and pid), so
# one whose writer on this host is gone is removed at once; another host's only by age.
STALE_TEMPORARY_SECONDS = 60


def worker_host() -> str:
    """The machine name a worker records on its trials (DIGITLAB_WORKER_HOST overrides it)."""
    return os.environ.get("DIGITLAB_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    return f"{worker_host()}:{os.getpid()}"


def owner_is_gone(worker: str) -> bool:
    """Whether the `host:pid` that ran a trial is a dead process of this machine; another
    machine's trials are left to heartbeats (RDB storage)."""
    host, _, pid = worker.rpartition(":")
    if host != worker_host():
        return False
    return not pid.isdigit() or process_is_gone(int(pid))


def process_is_gone(pid: int) -> bool:
    """Whether no process of this machine has the id `pid` (one we may not signal is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _writer_is_gone(name: str, prefix: str) -> bool:
    """Whether the temporary file `name` (prefix + host-pid.random.tmp) was left by a
    process of this host that no longer runs."""
    writer = name[len(prefix):].removesuffix(".tmp").rpartition(".")[0]  # mkstemp's part has no dot
    host, _, pid = writer.rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and process_is_gone(int(pid))


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644,
                 check: Callable[[Path], object] | None = None) -> None:
    """Write `data` to a temporary file beside `path`, `check` it, then rename it over
    `path`: a reader sees the old file or the new one, never half of one. Temporary files
    that killed writers left beside `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        with contextlib.suppress(OSError):
            if (_writer_is_gone(stale.name, prefix)
                    or time.time() - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS):
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        if check is not None:
            check(Path(tmp))
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (released if the holder dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Environment variables set (or, with None, removed) for the block, then put back."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _put(values)
        yield
    finally:
        _put(saved)


def _put(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
