"""The shared budget under load: many processes on one Optuna journal, no training."""

import multiprocessing
import os
import stat

import optuna
import pytest

from digitlab import search
from digitlab.search.optuna_engine import OptunaEngine

SPACE = """
experiments: [dnn]
budget: {trials: 40, max_epochs: 1}
space:
  model.dropout: {type: float, low: 0.1, high: 0.5}
"""


def hammer(space_path: str, cwd: str, queue) -> None:
    """Reserve and finish trials as fast as possible until the budget is used up."""
    os.chdir(cwd)
    try:
        engine = OptunaEngine(search.make_settings(space_path, study="load"))
        done = 0
        while (trial := engine._reserve()) is not None:
            trial.suggest_float("model.dropout", 0.1, 0.5)
            engine.study.tell(trial, 0.5)
            done += 1
        queue.put(("ok", done))
    except BaseException as exc:  # reported to the test, which fails on it
        queue.put(("error", repr(exc)))


@pytest.mark.slow
def test_four_processes_never_overshoot_the_budget(workdir):
    path = workdir / "load.yaml"
    path.write_text(SPACE)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=hammer, args=(str(path), str(workdir), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(kind == "ok" for kind, _ in results), results
    assert sum(n for _, n in results) == 40
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "optuna.journal")))
    trials = optuna.load_study(study_name="load", storage=storage).trials
    assert len(trials) == 40
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


@pytest.fixture
def two_fake_gpus(tmp_path, monkeypatch):
    """An `nvidia-smi` that lists two GPUs, so the coordinator assigns one per worker."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\necho 'GPU 1: Fake (UUID: GPU-1)'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.slow
def test_worker_i_sees_gpu_i_mod_g(workdir, tiny_dir, two_fake_gpus):
    from digitlab import runtime

    assert runtime.gpu_count() == 2
    path = workdir / "gpu.yaml"
    path.write_text(SPACE.replace("trials: 40", "trials: 4"))
    settings = search.make_settings(str(path), workers=2, data_dir=str(tiny_dir), study="gpus")
    search.run_study(settings)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "optuna.journal")))
    trials = optuna.load_study(study_name="gpus", storage=storage).trials
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["cuda_visible_devices"])
    assert sorted(map(sorted, by_worker.values())) == [["0"], ["1"]]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the coordinator's own is untouched
