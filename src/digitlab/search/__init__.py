"""`digitlab search`: a study over one search-space file, on Optuna or KerasTuner.

The flow is the same for both engines: load data (bad data stops us before
anything exists), open or resume the study, reopen or create its parent MLflow
run, recover trials that a killed process left RUNNING, run the trials (in
this process, or in N worker processes), then summarise into the parent run.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time

from mlflow import MlflowClient

from digitlab import data as data_mod
from digitlab import registry, runtime, tracking
from digitlab.errors import SearchFailed, Terminated, UserError
from digitlab.search import report
from digitlab.search.settings import ENGINES, Settings
from digitlab.search.space import SearchSpace, load


def make_settings(space_path: str, engine: str = "optuna", trials: int | None = None,
                  max_epochs: int | None = None, minutes: float | None = None, workers: int = 1, storage: str | None = None,
                  study: str | None = None, data_dir: str | None = None, seed: int = 42) -> Settings:
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if engine == "kerastuner" and workers > 1:
        raise UserError("the kerastuner engine runs one worker; use --engine optuna for --workers > 1")
    space: SearchSpace = load(space_path)
    budget = {}
    if trials:
        budget["trials"] = trials
    if max_epochs:
        budget["max_epochs"] = max_epochs
    if minutes:
        budget["minutes"] = minutes
    space = dataclasses.replace(space, **budget)
    if space.trials < 1 or space.max_epochs < 1 or (space.minutes is not None and space.minutes <= 0):
        raise UserError("--trials, --max-epochs and --minutes must be positive")
    return Settings(space=space, engine=engine, study=study or f"{space.name}-{engine}",
                    storage=storage, workers=workers, data_dir=data_dir, seed=seed)


def _engine(settings: Settings):
    if settings.engine == "kerastuner":
        from digitlab.search.kerastuner_engine import KerasTunerEngine

        return KerasTunerEngine(settings)
    from digitlab.search.optuna_engine import OptunaEngine

    return OptunaEngine(settings)


class Progress:
    """A trial progress bar: finished trials out of the budget, best trial so far.

    The best trial is the registry's (objective, then validation loss), so the bar names
    the same trial as the search's best_run_id and `digitlab promote` on a tie.
    """

    def __init__(self, engine, settings: Settings, parent_run_id: str) -> None:
        from tqdm import tqdm

        self.engine, self.metric, self.parent_run_id = engine, settings.space.metric, parent_run_id
        self.bar = tqdm(total=settings.trials, initial=engine.finished(), unit="trial",
                        desc=f"search {settings.study}", dynamic_ncols=True)
        self.done = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(2.0):
            self.refresh()

    def best(self) -> tuple[float, str] | None:
        client = MlflowClient()
        ranked = registry.ranked_trials(client, client.get_run(self.parent_run_id))
        if not ranked:
            return None
        return ranked[0].data.metrics["objective"], ranked[0].data.tags.get("trial_number", "?")

    def refresh(self) -> None:
        try:
            done = self.engine.finished()
            if done == self.done:
                return  # redraw only on news, so logs stay readable
            best = self.best()
        except Exception:  # a busy storage only delays the bar
            return
        self.done = done
        self.bar.n = min(done, self.bar.total)
        if best:
            self.bar.set_postfix({f"best {self.metric}": f"{best[0]:.4f}", "trial": best[1]},
                                 refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.refresh()
        self.bar.close()


def run(settings: Settings) -> dict:
    """Run (or resume) the study to its budget; returns the summary.

    With `budget.minutes`, no trial starts once that many minutes have passed since
    this call began (every worker still runs one); the study stays open, and the
    same command goes on with it for as many minutes again.
    """
    if settings.space.minutes:
        settings = dataclasses.replace(settings, deadline=time.time() + 60 * settings.space.minutes)
    dataset = data_mod.load(settings.data_dir)
    tracking.configure()  # an unreachable tracking server stops us before the study exists
    engine = _engine(settings)
    engine.check_compatible()
    finished = engine.finished()
    if finished >= settings.trials:
        print(f"study {settings.study!r} is already finished ({finished} of {settings.trials} "
              "trials); nothing to do")
        return {"already_finished": True}
    with engine.lock():  # workers starting together on several machines share one parent run
        parent_run_id, experiment_id = report.open_parent(settings, engine.parent_run_id)
        engine.set_parent_run_id(parent_run_id)
    recovered = engine.recover_interrupted(report.end_trial_run_killed)
    if recovered:
        print(f"trials {recovered} were interrupted: marked FAIL, their runs KILLED, parameters queued again")

    progress = Progress(engine, settings, parent_run_id)
    status = "FAILED"
    try:
        if settings.workers == 1:
            engine.work(dataset, parent_run_id, experiment_id)
        else:
            run_workers(settings, parent_run_id, experiment_id)
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        progress.close()
        rows = engine.rows()
        summary = report.finish(settings, parent_run_id, rows, status=status)
    summary.update(parent_run_id=parent_run_id, study=settings.study, rows=rows,
                   out_of_time=settings.out_of_time() and engine.finished() < settings.trials)
    return summary


# --- parallel workers --------------------------------------------------------------


def run_workers(settings: Settings, parent_run_id: str, experiment_id: str) -> None:
    """N worker processes on one study; worker i sees only GPU i mod G."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked TF state
    gpus = runtime.gpu_count()
    processes = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i in range(settings.workers):
            if gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            p = context.Process(target=_worker, name=f"digitlab-worker-{i}", daemon=True,
                                args=(settings, parent_run_id, experiment_id, os.getpid()))
            p.start()
            processes.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
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
    tracking.configure()
    engine = _engine(settings)
    engine.work(data_mod.load(settings.data_dir), parent_run_id, experiment_id)
