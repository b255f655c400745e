"""The search's final stage: the chosen configurations trained again on every labelled
image, for the length the budget's plan gave them, as runs nested under the search's
parent run. What the trials find is a configuration; what Kaggle gets is a final model.

A trial is short on purpose (many are compared in the budget); a final model is trained
for the data's own length (`final.passes`), with the trial's epochs stretched to that
length, so the learning-rate annealer and weight averaging keep the shape they had in
the trial (`refit.on_all_images`).

Members and weights: greedy selection over the trials' held-out predictions (the images
the trials were ranked on, the same for every trial of the study) picks configurations
and weights, as `promote --ensemble auto` does for trials; each picked configuration is
trained once, heaviest first, and models left over are other seeds of the heaviest. The
final models keep those weights: they have no held-out image left of their own
(docs/registry-and-serving.md says why this choice).

The parent run records the stage in tags: `final_plan` (set when the stage starts: the
members, their seeds and weights, their length and the data), `final_run_ids` and
`final_weights` (set when it ends). A process killed during the stage leaves its finished
models and a RUNNING run; the same `digitlab search` command ends that run KILLED and
trains only what is missing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import config as config_mod
from digitlab import console, osutil, refit
from digitlab.data import DigitData
from digitlab.errors import UserError
from digitlab.search import ensemble, ranking

log = logging.getLogger("digitlab.search")

KIND = "final"
PLAN_TAG, RUNS_TAG, WEIGHTS_TAG = "final_plan", "final_run_ids", "final_weights"
SEED_STRIDE = 1000  # another seed of a configuration: far from every trial's (seed + number)
GREEDY_PICKS = 10  # greedy selection's most picks (with repeats), as promote --ensemble auto's default


@dataclass(frozen=True)
class Member:
    index: int  # 1..N, the order of the final runs
    trial_run_id: str
    trial_number: str
    seed: int
    weight: float  # in the final models' average; the members' weights sum to 1


def choose(trials: list[Run], models: int) -> list[Member]:
    """`models` members from `trials` (ranked best first) and their weights.

    The configurations and weights are those that greedy selection picks from the trials'
    held-out predictions (`search.ensemble`, as `promote --ensemble auto` picks trials);
    trials that stored no predictions are taken in rank order, with equal weights."""
    try:
        choice = ensemble.choose(trials, max(GREEDY_PICKS, models))
        return allot(choice.members, choice.weights, models)
    except UserError:
        return allot(trials[:models], [1.0] * min(models, len(trials)), models)


def allot(picked: list[Run], weights: list[float], models: int) -> list[Member]:
    """One final model per picked configuration, heaviest first, as far as `models` go;
    models left over are other seeds of the heaviest, sharing its weight."""
    picked, weights = picked[:models], weights[:models]
    configs = list(range(len(picked))) + [0] * (models - len(picked))
    total = sum(weights)
    members, seen = [], [0] * len(picked)
    for i, k in enumerate(configs):
        trial = picked[k]
        seen[k] += 1
        seed = int(trial.data.params.get("seed", 0)) + SEED_STRIDE * (seen[k] - 1)
        weight = weights[k] / total / configs.count(k)
        members.append(Member(i + 1, trial.info.run_id, trial.data.tags.get("trial_number", "?"),
                              seed, weight))
    return members


def pending(parent: Run) -> bool:
    """Whether the search planned a final stage that has not ended."""
    tags = parent.data.tags
    return PLAN_TAG in tags and RUNS_TAG not in tags


def run_ids(parent: Run) -> list[str]:
    """The final models of a search whose final stage ended; [] for one without."""
    return [i for i in parent.data.tags.get(RUNS_TAG, "").split(",") if i]


def weights(parent: Run) -> list[float]:
    """The final models' weights, in the order of `run_ids`."""
    return [float(w) for w in parent.data.tags.get(WEIGHTS_TAG, "").split(",") if w]


def _planned(client: MlflowClient, parent: Run, dataset: DigitData, models: int,
             images: int) -> dict | None:
    """The stage's plan: the one the parent records (a resumed stage keeps its members and
    length), or a new one from the ranking; None when no trial completed."""
    if stored := parent.data.tags.get(PLAN_TAG):
        plan = json.loads(stored)
        if plan["data_digest"] != dataset.digest:
            raise UserError(f"search run {parent.info.run_id} planned its final training on data "
                            f"{plan['data_digest'][:12]}, but the data directory holds "
                            f"{dataset.digest[:12]}: pass the same --data-dir")
        return plan
    trials = ranking.ranked_trials(client, parent)
    if not trials or not models:
        return None
    plan = {"images": images, "data_digest": dataset.digest,
            "members": [m.__dict__ for m in choose(trials, models)]}
    client.set_tag(parent.info.run_id, PLAN_TAG, json.dumps(plan))
    return plan


def _finished(client: MlflowClient, parent: Run, index: int, digest: str) -> Run | None:
    """Final model `index` of this stage, if a finished run of it exists; ends the
    RUNNING ones whose process on this machine died (kill -9 leaves them RUNNING)."""
    this = f"tags.final_index = '{index}'"
    refit.end_abandoned(client, parent, this, KIND)
    done = refit.nested(client, parent, f"{this} and attributes.status = 'FINISHED'", KIND)
    done = [r for r in done if r.data.params.get("data.digest") == digest]
    return done[0] if done else None


def _seconds(trial: Run, images: int) -> float | None:
    """What a final model of `trial`'s configuration takes: its trial's own measured time,
    scaled to `images` (the plan timed the study's first configuration, and a wider one
    that won the trials trains slower)."""
    metrics = trial.data.metrics
    if not metrics.get("train_seconds") or not metrics.get("images_seen"):
        return None
    return metrics["train_seconds"] * images / metrics["images_seen"]


def run_stage(parent_run_id: str, dataset: DigitData, models: int, images: int,
              seconds_per_model: float, deadline: float | None = None) -> list[str]:
    """Train (or finish) the search's final models; returns their run ids, best first.

    No model after the first starts that the plan says cannot end before `deadline`
    (time.time()); the first always trains, since the trials' time was cut to leave it room.
    """
    from digitlab.training_run import tracked_run
    from digitlab.validation import AllImages

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    if RUNS_TAG in parent.data.tags:
        return run_ids(parent)
    plan = _planned(client, parent, dataset, models, images)
    if plan is None:
        return []
    members = [Member(**m) for m in plan["members"]]
    done: list[tuple[str, float]] = []
    for member in members:
        if found := _finished(client, parent, member.index, dataset.digest):
            done.append((found.info.run_id, member.weight))
            continue
        trial = client.get_run(member.trial_run_id)
        seconds = _seconds(trial, plan["images"]) or seconds_per_model
        if done and deadline is not None and time.time() + seconds > deadline:
            log.info("final model %d of %d not started: it cannot end within the budget",
                     member.index, len(members))
            continue
        config = refit.on_all_images(refit.rebuild(trial), refit.length(trial), plan["images"])
        config = config_mod.apply_overrides(config, {"seed": member.seed})
        passes = plan["images"] / len(dataset.train_labels)
        tags = {"digitlab.kind": KIND, "refit_of": member.trial_run_id, "final_index": member.index,
                "final_weight": f"{member.weight:.6g}",
                "trial_number": member.trial_number, "final_images": plan["images"],
                "final_passes": f"{passes:.3g}", "refit_epochs": config.training.epochs,
                "worker": osutil.worker_id()}
        name = f"final {member.index}/{len(members)}: trial {member.trial_number}"
        log.info("%s: %.3g passes (%s images) on all %s labelled images, seed %d", name, passes,
                 f"{plan['images']:,}", f"{len(dataset.train_labels):,}", member.seed)
        run_id, _, _ = tracked_run(config, dataset, name=name, tags=tags, parent_run_id=parent_run_id,
                                   experiment_id=parent.info.experiment_id,
                                   verbose=2 if console.verbose() else 0, validation=AllImages())
        done.append((run_id, member.weight))
    total = sum(w for _, w in done)  # a model that did not start leaves its weight to the others
    client.set_tag(parent_run_id, WEIGHTS_TAG, ",".join(f"{w / total:.6g}" for _, w in done))
    client.set_tag(parent_run_id, RUNS_TAG, ",".join(i for i, _ in done))
    return [i for i, _ in done]
