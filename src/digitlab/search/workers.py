"""Worker processes of one study: N fresh interpreters, worker i on GPU i mod G.

Imports nothing heavy at module level: a spawned worker imports this module
first and sets up quiet logging before TensorFlow loads.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

from digitlab import osutil
from digitlab.errors import SearchFailed
from digitlab.search.engine import Engine
from digitlab.search.settings import Settings


def engine_for(settings: Settings) -> Engine:
    if settings.engine == "kerastuner":
        from digitlab.search.kerastuner_engine import KerasTunerEngine

        return KerasTunerEngine(settings)
    from digitlab.search.optuna_engine import OptunaEngine

    return OptunaEngine(settings)


def run_workers(settings: Settings, parent_run_id: str, experiment_id: str) -> None:
    """N worker processes on one study; worker i sees only GPU i mod G."""
    from digitlab import runtime

    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked TF state
    gpus = runtime.gpu_count()
    processes = []
    for i in range(settings.workers):
        gpu = str(i % gpus) if gpus else os.environ.get("CUDA_VISIBLE_DEVICES")
        with osutil.environ(CUDA_VISIBLE_DEVICES=gpu):  # what the spawned worker inherits
            p = context.Process(target=_worker, name=f"digitlab-worker-{i}", daemon=True,
                                args=(settings, parent_run_id, experiment_id, os.getpid()))
            p.start()
        processes.append(p)
    for p in processes:
        p.join()
    failed = [f"{p.name} (exit {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise SearchFailed(f"worker(s) failed: {', '.join(failed)}")


def _worker(settings: Settings, parent_run_id: str, experiment_id: str, parent_pid: int) -> None:
    # A worker must not outlive its coordinator, even when that is SIGKILLed.
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    from digitlab import console

    console.setup()
    console.import_backend()
    from digitlab import data, store

    store.configure()
    engine_for(settings).work(data.load(settings.data_dir), parent_run_id, experiment_id)
