"""The budget's plan: what the study's time buys on this machine and this data, said before
the first trial, not discovered at the end.

A short run of the study's first trial configuration (two epochs of a few batches, at the
data's real size, untracked) times a training step and a validation pass; one epoch, one
first-rung trial, one full trial and one final model follow from them. `Plan.split` then
divides the budget between the trials and final training (the search file's `budget` and
`final` sections), and the same figures give the progress bar its time left and the
search the last moment a trial may start.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass

from digitlab.console import duration
from digitlab.data import DigitData
from digitlab.errors import UserError
from digitlab.search.settings import Settings

log = logging.getLogger("digitlab.search")


@dataclass(frozen=True)
class Plan:
    epoch_seconds: float  # one epoch of the first trial's configuration, validation included
    epochs: int  # a full trial's
    first_rung: int  # epochs a trial trains before it can first be stopped
    runs_per_trial: int  # K for K-fold trials, else 1
    epoch_images: int
    train_images: int
    step_seconds: float = 0.0  # one training batch (final training has no validation pass)
    batch_size: int = 64
    labelled_images: int = 0  # what final training trains on: every labelled image
    final_models: int = 0
    final_images: int = 0  # each final model's length
    # the trials' time: none starts that cannot end within it; None: no limit
    search_seconds: float | None = None

    @property
    def trial_seconds(self) -> float:
        return self.epochs * self.epoch_seconds * self.runs_per_trial

    @property
    def trial_images(self) -> int:
        """What one model of a full trial trains on: the shortest a final model may be."""
        return self.epochs * self.epoch_images

    @property
    def rung_seconds(self) -> float:
        return self.first_rung * self.epoch_seconds  # pruned on the first fold (K-fold)

    def final_seconds(self, images: int | None = None) -> float:
        """One final model of `images` (the planned length) on every labelled image."""
        return math.ceil((images or self.final_images) / self.batch_size) * self.step_seconds

    @property
    def total_seconds(self) -> float | None:
        if self.search_seconds is None:
            return None
        return self.search_seconds + self.final_models * self.final_seconds()

    def line(self) -> str:
        """The one line a search prints before its first trial: how the budget is split
        between the trials and final training, and what each buys here."""
        trial = duration(self.trial_seconds)
        what = (f"{self.epochs} epochs of {self.epoch_images:,} images"
                + (f", x{self.runs_per_trial} models" if self.runs_per_trial > 1 else "")
                + f", from {self.train_images:,} training images")
        if self.search_seconds is None:
            search = f"plan: trials until the trial budget is spent, a full trial ({what}) about {trial}"
        else:
            full = int(self.search_seconds // self.trial_seconds)
            rungs = int(self.search_seconds // max(self.rung_seconds, 1e-9))
            search = (f"plan: search {duration(self.search_seconds)}, about {full} full "
                      f"trial{'' if full == 1 else 's'} ({what}: {trial} each) or {rungs} first-rung "
                      f"ones ({self.first_rung} epoch{'' if self.first_rung == 1 else 's'}, "
                      f"{duration(self.rung_seconds)} each)")
        if not self.final_models:
            return search + "; no final training (promote registers trials)"
        passes = self.final_images / max(self.labelled_images, 1)
        final = (f"final training {duration(self.final_models * self.final_seconds())}, "
                 f"{self.final_models} model{'' if self.final_models == 1 else 's'} of "
                 f"{passes:.3g} passes ({self.final_images:,} images, {duration(self.final_seconds())} "
                 f"each) on all {self.labelled_images:,} labelled images")
        total = f"; {duration(self.total_seconds)} in all" if self.total_seconds is not None else ""
        return f"{search}; {final}{total}"

    def seconds_left(self, finished: float, total: int, elapsed: float) -> float:
        """Time left: the trials still to come at the rate so far (at first a full trial's
        cost each), capped by the trials' time, then final training's."""
        rate = elapsed / finished if finished >= 0.5 else self.trial_seconds
        left = max(0.0, total - finished) * rate
        if self.search_seconds is not None:
            left = min(left, max(0.0, self.search_seconds - elapsed))
        return left + self.final_models * self.final_seconds()

    def split(self, budget, final) -> Plan:
        """This plan with the study file's `budget` and `final` sections applied: the
        trials' time, the final models and their length.

        A total (`budget.minutes`) gives final training at most `final.share` of it: as many
        models of the planned length as fit there, else one model shortened to fit (never
        below a full trial's length); the trials get the rest. A total in which one full
        trial and the final training cannot both end is refused, saying what would fit."""
        plan = self._divided(budget.minutes, budget.search_minutes, final)
        if budget.minutes is not None and plan.search_seconds < self.trial_seconds:
            enough = next(m for m in itertools.count(math.floor(budget.minutes) + 1)
                          if self._divided(m, None, final).search_seconds >= self.trial_seconds)
            least = plan.final_seconds(self.trial_images) if plan.final_models else 0.0
            raise UserError(
                f"--minutes {budget.minutes:g} is too short here: one full trial takes "
                f"{duration(self.trial_seconds)}"
                + (f" and one final model at least {duration(least)}" if least else "")
                + f"; give --minutes {enough} or more, or fewer --max-epochs")
        return plan

    def _divided(self, minutes: float | None, search_minutes: float | None, final) -> Plan:
        images = max(self.trial_images, round(final.passes * self.labelled_images))
        if not final.models:
            limit = minutes or search_minutes
            return dataclasses.replace(self, search_seconds=limit * 60 if limit else None)
        if minutes is None:
            return dataclasses.replace(self, final_models=final.models, final_images=images,
                                       search_seconds=search_minutes * 60 if search_minutes else None)
        total = minutes * 60
        room = final.share * total
        models = int(room / self.final_seconds(images) + 1e-9)
        if models < 1:
            models = 1
            batches = int(room / max(self.step_seconds, 1e-9) + 1e-9)
            images = max(self.trial_images, batches * self.batch_size)
        return dataclasses.replace(self, final_models=models, final_images=images,
                                   search_seconds=total - models * self.final_seconds(images))


def measure(settings: Settings, data: DigitData) -> Plan:
    """Time two short epochs of the first trial's configuration on the real split."""
    from digitlab import data as data_mod
    from digitlab import train

    study_file = settings.study_file
    config = study_file.trial_config(dict(study_file.start), settings.seed, 0)
    t = config.training
    scheme = study_file.validator
    split = data_mod.take(data, *scheme.splits(data.train_labels, config)[0])
    step, val_seconds = train.time_step(config, data, split)
    n = len(split.train_labels)
    steps = math.ceil((t.epoch_images or n) / t.batch_size)
    epochs = study_file.budget.max_epochs
    plan = Plan(epoch_seconds=steps * step + val_seconds, epochs=epochs,
                first_rung=study_file.optuna.min_epochs if stops_early(settings) else epochs,
                runs_per_trial=scheme.n_splits, epoch_images=steps * t.batch_size, train_images=n,
                step_seconds=step, batch_size=t.batch_size, labelled_images=len(data.train_labels))
    return plan.split(study_file.budget, study_file.final)


def stops_early(settings: Settings) -> bool:
    """Whether the engine stops trials before their last epoch (a pruner, or Hyperband)."""
    if settings.engine == "optuna":
        return settings.study_file.optuna.pruner != "none"
    return settings.study_file.kerastuner.tuner == "hyperband"
