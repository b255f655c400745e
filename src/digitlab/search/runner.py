"""One `digitlab search` from start to summary, the same for both engines.

Load data (bad data stops us before anything exists), plan the budget (a budget too
small stops us too), open or resume the study, reopen or create its parent MLflow run,
recover trials that a killed process left RUNNING, run the trials (in this process, or
in N worker processes), summarise into the parent run, then train the final models
(`search.final`) under it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from mlflow import MlflowClient

from digitlab import console, store
from digitlab import data as data_mod
from digitlab.errors import Terminated
from digitlab.search import final, parent_run, ranking
from digitlab.search import plan as plan_mod
from digitlab.search.settings import Settings
from digitlab.search.workers import engine_for, run_workers

log = logging.getLogger(__name__)


class Progress:
    """One progress bar over both stages: finished trials out of the budget, then final
    models; a running trial's or final model's share of its full length (images seen), so
    it moves during a long run; the time left by the budget's plan; the best trial so far.

    The best trial is the registry's (objective, then validation loss), so the bar names
    the same trial as the search's best_run_id and `digitlab promote` on a tie.
    """

    def __init__(self, engine, settings: Settings, parent_run_id: str, plan: plan_mod.Plan) -> None:
        from tqdm import tqdm

        self.engine, self.metric, self.parent_run_id = engine, settings.study_file.scored_by, parent_run_id
        self.plan, self.trials, self.started = plan, settings.trials, time.time()
        self.final = False  # in the final stage
        unit = "trials + final models" if plan.final_models else "trials"
        self.bar = tqdm(total=settings.trials + plan.final_models, initial=engine.finished(),
                        desc=f"search {settings.study}", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total} " + unit + " [{elapsed}{postfix}]")
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

    def _children(self, condition: str) -> list:
        client = MlflowClient()
        return client.search_runs(
            [client.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and {condition}")

    def running_share(self) -> float:
        """The running runs' images seen, each in its full length (0 to 1 each)."""
        trial = self.plan.trial_images * self.plan.runs_per_trial
        shares = []
        for run in self._children("attributes.status = 'RUNNING'"):
            full = self.plan.final_images if run.data.tags.get("digitlab.kind") == final.KIND else trial
            seen = sum(v for k, v in run.data.metrics.items() if k.endswith("images_seen"))
            shares.append(min(1.0, seen / max(full, 1)))
        return sum(shares)

    def start_final(self) -> None:
        self.final = True
        self.bar.desc = self.bar.desc.replace("search ", "final training ", 1)
        self.refresh()

    def position(self) -> float:
        if self.final:
            finished = len(self._children(f"tags.`digitlab.kind` = '{final.KIND}' "
                                          "and attributes.status = 'FINISHED'"))
            return self.trials + min(finished + self.running_share(), self.plan.final_models)
        done = self.engine.finished()
        return done + (self.running_share() if done < self.trials else 0.0)

    def refresh(self) -> None:
        try:
            position = self.position()
            if round(position, 1) == self.done:
                return  # redraw only on news, so logs stay readable
            best = self.best()
        except Exception:  # a busy storage only delays the bar
            return
        self.done = round(position, 1)
        self.bar.n = min(position, self.bar.total)
        elapsed = time.time() - self.started
        if self.final:
            left = (self.bar.total - position) * self.plan.final_seconds()
        else:
            left = self.plan.seconds_left(position - self.initial, self.trials - self.initial, elapsed)
        postfix = {"left": f"~{console.duration(left)}"}
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
    """Run (or resume) the study to its budget, then its final stage; returns the summary.

    The budget's plan (measured here, before the study exists, so a budget too small is
    refused with nothing created) gives the trials their time: no trial starts that could
    not end within it. The study stays open, and the same command goes on with it for as
    much time again; a final stage that did not end is finished by the same command.
    """
    if dataset is None:
        dataset = data_mod.load(settings.data_dir)
    store.configure()  # an unreachable tracking server stops us before the study exists
    plan = plan_mod.measure(settings, dataset)
    started = time.time()
    if plan.search_seconds is not None:
        settings = dataclasses.replace(
            settings, deadline=started + plan.search_seconds - plan.trial_seconds)
    ends = started + plan.total_seconds if plan.total_seconds is not None else None
    engine = engine_for(settings)
    engine.check_compatible()
    finished = engine.finished()
    if finished >= settings.trials and not _final_to_do(settings, engine.parent_run_id):
        log.info("study %r is already finished (%d of %d trials); nothing to do",
                 settings.study, finished, settings.trials)
        parent_run.point_to(engine.parent_run_id)
        return {"already_finished": True}
    plan_line = plan.line()
    log.info("%s", plan_line)
    with engine.lock():  # workers starting together on several machines share one parent run
        parent_run_id, experiment_id = parent_run.open_or_resume(settings, engine.parent_run_id)
        engine.set_parent_run_id(parent_run_id)
    recovered = engine.recover_interrupted(parent_run.end_trial_run_killed)
    if recovered:
        log.info("trials %s were interrupted: marked FAIL, their runs KILLED, parameters queued again",
                 recovered)

    MlflowClient().set_tag(parent_run_id, "budget_plan", plan_line)
    progress = Progress(engine, settings, parent_run_id, plan)
    try:
        summary = _trials(engine, settings, dataset, parent_run_id, experiment_id)
        if plan.final_models and summary["best"]:
            progress.start_final()
            summary["final_run_ids"] = final.run_stage(
                parent_run_id, dataset, plan.final_models, plan.final_images, plan.final_seconds(),
                deadline=ends)
    finally:
        progress.close()
    if settings.study_file.refit and summary["best"]:
        # The study's `refit: true`: the best trial, trained again on every labelled image,
        # nested under it; `digitlab promote --refit` finds and registers this run.
        from digitlab import refit

        best = MlflowClient().get_run(summary["best"]["run_id"])
        summary["refit_run_id"] = refit.refit(best, dataset).info.run_id
    return summary


def _final_to_do(settings: Settings, parent_run_id: str | None) -> bool:
    """Whether a study whose trials are done still owes its final stage."""
    if not settings.study_file.final.models or not parent_run_id:
        return False
    return final.RUNS_TAG not in MlflowClient().get_run(parent_run_id).data.tags


def _trials(engine, settings: Settings, dataset, parent_run_id: str, experiment_id: str) -> dict:
    """The trials stage, then its summary into the parent run (whatever ended the trials)."""
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
        rows = engine.rows()
        summary = parent_run.finish(settings, parent_run_id, rows, status=status)
    summary.update(parent_run_id=parent_run_id, study=settings.study, rows=rows,
                   out_of_time=settings.out_of_time() and engine.finished() < settings.trials)
    return summary
