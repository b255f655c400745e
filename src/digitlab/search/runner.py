"""One `digitlab search` from start to summary, the same for both engines.

Load data (bad data stops us before anything exists), open or resume the study,
reopen or create its parent MLflow run, recover trials that a killed process left
RUNNING, run the trials (in this process, or in N worker processes), then
summarise into the parent run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from mlflow import MlflowClient

from digitlab import data as data_mod
from digitlab import store
from digitlab.errors import Terminated
from digitlab.search import plan as plan_mod
from digitlab.search import ranking, report
from digitlab.search.settings import Settings
from digitlab.search.workers import engine_for, run_workers

log = logging.getLogger(__name__)


class Progress:
    """A trial progress bar: finished trials out of the budget, and the running trials'
    share of a full trial (images seen), so it moves during a long trial; the time left by
    the budget's plan; the best trial so far.

    The best trial is the registry's (objective, then validation loss), so the bar names
    the same trial as the search's best_run_id and `digitlab promote` on a tie.
    """

    def __init__(self, engine, settings: Settings, parent_run_id: str, plan: plan_mod.Plan) -> None:
        from tqdm import tqdm

        self.engine, self.metric, self.parent_run_id = engine, settings.study_file.scored_by, parent_run_id
        self.plan, self.minutes, self.started = plan, settings.study_file.budget.minutes, time.time()
        self.bar = tqdm(total=settings.trials, initial=engine.finished(), unit="trial",
                        desc=f"search {settings.study}", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total} trials [{elapsed}{postfix}]")
        self.initial = engine.finished()
        self.done = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(2.0):
            self.refresh()

    def best(self) -> tuple[float, str] | None:
        client = MlflowClient()
        ranked = ranking.ranked_trials(client, client.get_run(self.parent_run_id))
        if not ranked:
            return None
        return ranked[0].data.metrics["objective"], ranked[0].data.tags.get("trial_number", "?")

    def running_share(self) -> float:
        """The running trials' images seen, in full trials (0 to 1 each)."""
        client = MlflowClient()
        running = client.search_runs(
            [client.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                          "and attributes.status = 'RUNNING'")
        full = self.plan.epochs * self.plan.epoch_images * self.plan.runs_per_trial
        seen = [sum(v for k, v in r.data.metrics.items() if k.endswith("images_seen")) for r in running]
        return sum(min(1.0, s / full) for s in seen)

    def refresh(self) -> None:
        try:
            done = self.engine.finished()
            position = done + (self.running_share() if done < self.bar.total else 0.0)
            if (done, round(position, 1)) == self.done:
                return  # redraw only on news, so logs stay readable
            best = self.best()
        except Exception:  # a busy storage only delays the bar
            return
        self.done = (done, round(position, 1))
        self.bar.n = min(position, self.bar.total)
        left = self.plan.seconds_left(position - self.initial, self.bar.total - self.initial,
                                      time.time() - self.started, self.minutes)
        postfix = {"left": f"~{plan_mod.duration(left)}"}
        if best:
            postfix.update({f"best {self.metric}": f"{best[0]:.4f}", "trial": best[1]})
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.refresh()
        self.bar.close()


def run_study(settings: Settings, dataset: data_mod.DigitData | None = None) -> dict:
    """Run (or resume) the study to its budget; returns the summary.

    With `budget.minutes`, no trial starts once that many minutes have passed since
    this call began (every worker still runs one); the study stays open, and the
    same command goes on with it for as many minutes again.
    """
    if minutes := settings.study_file.budget.minutes:
        settings = dataclasses.replace(settings, deadline=time.time() + 60 * minutes)
    if dataset is None:
        dataset = data_mod.load(settings.data_dir)
    store.configure()  # an unreachable tracking server stops us before the study exists
    engine = engine_for(settings)
    engine.check_compatible()
    finished = engine.finished()
    if finished >= settings.trials:
        log.info("study %r is already finished (%d of %d trials); nothing to do",
                 settings.study, finished, settings.trials)
        report.point_to_parent(engine.parent_run_id)
        return {"already_finished": True}
    plan = plan_mod.measure(settings, dataset)
    plan_line = plan.line(settings.study_file.budget.minutes)
    log.info("%s", plan_line)
    with engine.lock():  # workers starting together on several machines share one parent run
        parent_run_id, experiment_id = report.open_parent(settings, engine.parent_run_id)
        engine.set_parent_run_id(parent_run_id)
    recovered = engine.recover_interrupted(report.end_trial_run_killed)
    if recovered:
        log.info("trials %s were interrupted: marked FAIL, their runs KILLED, parameters queued again",
                 recovered)

    MlflowClient().set_tag(parent_run_id, "budget_plan", plan_line)
    progress = Progress(engine, settings, parent_run_id, plan)
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
    if settings.study_file.refit and summary["best"]:
        # The study's `refit: true`: the best trial, trained again on every labelled image,
        # nested under it; `digitlab promote --refit` finds and registers this run.
        from digitlab import refit

        best = MlflowClient().get_run(summary["best"]["run_id"])
        summary["refit_run_id"] = refit.refit(best, dataset).info.run_id
    return summary
