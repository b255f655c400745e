"""The budget's plan: what the study's time buys on this machine and this data, said before
the first trial, not discovered at the end.

A short run of the study's first trial configuration (two epochs of a few batches, at the
data's real size, untracked) times a training step and a validation pass; one epoch, one
first-rung trial and one full trial follow from them. The same figures give the progress
bar its time left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

from digitlab.data import DigitData
from digitlab.search.settings import Settings

log = logging.getLogger("digitlab.search")

TIMED_BATCHES = 8  # per timed epoch: enough to average out a step's jitter, a few seconds


@dataclass(frozen=True)
class Plan:
    epoch_seconds: float  # one epoch of the first trial's configuration, validation included
    epochs: int  # a full trial's
    first_rung: int  # epochs a trial trains before it can first be stopped
    runs_per_trial: int  # K for K-fold trials, else 1
    epoch_images: int
    train_images: int

    @property
    def trial_seconds(self) -> float:
        return self.epochs * self.epoch_seconds * self.runs_per_trial

    @property
    def rung_seconds(self) -> float:
        return self.first_rung * self.epoch_seconds  # pruned on the first fold (K-fold)

    def line(self, minutes: float | None) -> str:
        """The one line a search prints before its first trial."""
        trial = duration(self.trial_seconds)
        head = (f"plan: one full trial ({self.epochs} epochs of {self.epoch_images:,} images"
                + (f", x{self.runs_per_trial} models" if self.runs_per_trial > 1 else "")
                + f", from {self.train_images:,} training images) takes about {trial} here")
        if not minutes:
            return head
        budget = minutes * 60
        full = int(budget // self.trial_seconds)
        rungs = int(budget // max(self.rung_seconds, 1e-9))
        line = (f"{head}; {minutes:g} min fit about {full} full trial{'' if full == 1 else 's'} "
                f"or {rungs} first-rung ones ({self.first_rung} epoch{'' if self.first_rung == 1 else 's'}, "
                f"{duration(self.rung_seconds)} each)")
        if full < 1:
            # No trial starts after the budget, but one that started runs to its end.
            needed = math.ceil(self.trial_seconds / 60)
            fits = max(1, int(budget // (self.epoch_seconds * self.runs_per_trial)))
            line += (f". The budget cannot finish one full trial: the first runs past it to about "
                     f"{trial}. Give --minutes {needed} or more, or --max-epochs {min(fits, self.epochs)}")
        return line

    def seconds_left(self, finished: float, total: int, elapsed: float, minutes: float | None) -> float:
        """Time left: the trials still to come at the rate so far (at first a full trial's
        cost each), capped by the time budget plus one trial started just before it ends."""
        rate = elapsed / finished if finished >= 0.5 else self.trial_seconds
        left = max(0.0, total - finished) * rate
        if minutes:
            left = min(left, max(0.0, minutes * 60 - elapsed) + self.trial_seconds)
        return left


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def measure(settings: Settings, data: DigitData) -> Plan:
    """Time two short epochs of the first trial's configuration on the real split."""
    from digitlab import data as data_mod
    from digitlab import train

    study_file = settings.study_file
    config = study_file.trial_config(dict(study_file.start), settings.seed, 0)
    t = config.training
    k = study_file.validator.models_per_run
    split = data_mod.split(data, study_file.validator.timing_fraction(config), config.split_seed)
    timed = dataclasses.replace(config, training=dataclasses.replace(
        t, epochs=2, epoch_images=TIMED_BATCHES * t.batch_size, subset_images=0, subset_epochs=0,
        early_stopping=dataclasses.replace(t.early_stopping, enabled=False),
        reduce_lr=dataclasses.replace(t.reduce_lr, enabled=False), average_last_epochs=0,
        restore_best=False))
    result = train.run(timed, data, split=split, verbose=0)
    started = time.perf_counter()
    train.predict(result.model, split.val_images)
    val_seconds = time.perf_counter() - started
    # The second epoch: the first also builds and compiles the model.
    step = max(result.epoch_seconds[-1] - val_seconds, 0.0) / TIMED_BATCHES
    n = len(split.train_labels)
    steps = math.ceil((t.epoch_images or n) / t.batch_size)
    epochs = study_file.budget.max_epochs
    return Plan(epoch_seconds=steps * step + val_seconds, epochs=epochs,
                first_rung=study_file.optuna.min_epochs if stops_early(settings) else epochs,
                runs_per_trial=k, epoch_images=steps * t.batch_size, train_images=n)


def stops_early(settings: Settings) -> bool:
    """Whether the engine stops trials before their last epoch (a pruner, or Hyperband)."""
    if settings.engine == "optuna":
        return settings.study_file.optuna.pruner != "none"
    return settings.study_file.kerastuner.tuner == "hyperband"
