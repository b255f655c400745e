"""How a run is validated, as one object: one held-out split, K folds, or (a refit)
nothing held out. Like scikit-learn's splitters, the ways share one small contract, so
the tracked-run path, the search and the registry never ask which way it is:

- `check(data, config)`: the data can be validated this way (before anything is written);
- `fit(config, data, ...)`: train through `train.run` (once, or once per fold);
- `tags(config)`, `datasets(config, data)`: what the run records, read back by `from_run`;
- `log_models(result)`, `scores(result)`: the models a finished run hands on, extra metrics;
- `score(groups, data, tta, weights)`: an ensemble's accuracy on what its members held
  out (`groups[m]`: member m's Keras models, one per fold);
- `scored_by`, `fingerprint`, `describe`, `options`, `models_per_run`: how a study of
  such runs is ranked, resumed, described and reproduced.

The K-fold trainer itself is `folds.FoldTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from digitlab import data as data_mod
from digitlab import folds
from digitlab.errors import UserError

if TYPE_CHECKING:
    from digitlab.config import ExperimentConfig
    from digitlab.data import DigitData


@dataclass
class Holdout:
    """One stratified validation split: `training.validation_fraction` of the labelled
    images, chosen by the split seed (the config's, unless given: a registry rebuilds it
    from a run's tags)."""

    fraction: float | None = None
    seed: int | None = None
    models_per_run = 1

    def _split(self, config: ExperimentConfig | None, data: DigitData) -> data_mod.Split:
        fraction = self.fraction if self.fraction is not None else config.training.validation_fraction
        seed = self.seed if self.seed is not None else config.split_seed
        return data_mod.split(data, fraction, seed)

    def check(self, data: DigitData, config: ExperimentConfig) -> None:
        data_mod.check_split(data, config.training.validation_fraction)

    def fit(self, config, data, callbacks=(), on_epoch=None, verbose="auto"):
        from digitlab import train

        return train.run(config, data, callbacks=list(callbacks), on_epoch=on_epoch, verbose=verbose)

    def tags(self, config: ExperimentConfig) -> dict:
        return {"split_seed": config.split_seed,
                "validation_fraction": config.training.validation_fraction}

    def datasets(self, config: ExperimentConfig, data: DigitData) -> tuple[dict, str]:
        split = self._split(config, data)
        return ({"training": (split.train_images, split.train_labels),
                 "validation": (split.val_images, split.val_labels)},
                f"{config.training.validation_fraction}|{config.split_seed}")

    def log_models(self, result) -> None:
        from digitlab import tracking

        tracking.log_model(result)

    def scores(self, result) -> dict:
        return {}

    def model_names(self, k_names: list[str]) -> list[str]:
        return k_names[:1]

    def score(self, groups: list[list], data: DigitData, tta: bool,
              weights: list[float] | None = None) -> float:
        from digitlab import serving

        split = self._split(None, data)
        classifier = serving.DigitClassifier([g[0] for g in groups], tta, weights)
        probabilities = classifier.probabilities(split.val_images)
        return float(np.mean(probabilities.argmax(1) == split.val_labels))

    def scored_by(self, metric: str) -> str:
        return metric

    def objective_problem(self, metric: str) -> str | None:
        return None

    def fingerprint(self) -> dict:
        return {}

    def describe(self) -> str:
        return ""

    def version_tags(self) -> dict:
        return {}

    def options(self) -> list[str]:
        return []

    def study_suffix(self) -> str:
        return ""

    def short(self) -> str:
        return ""

    def for_run(self, label: int | str) -> Holdout:
        return self

    def timing_fraction(self, config: ExperimentConfig) -> float:
        return config.training.validation_fraction


@dataclass
class KFold:
    """K stratified folds (`folds.assign`, by the split seed): K models per run, each
    validated on the fold it held out, the run scored out of fold on every image."""

    k: int
    seed: int | None = None
    label: int | str = ""  # the trial, in log lines
    trainer: folds.FoldTrainer | None = field(default=None, repr=False, compare=False)

    @property
    def models_per_run(self) -> int:
        return self.k

    def check(self, data: DigitData, config: ExperimentConfig) -> None:
        folds.check(data, self.k)

    def fit(self, config, data, callbacks=(), on_epoch=None, verbose="auto"):
        self.trainer = folds.FoldTrainer(self.k, self.label)
        return self.trainer(config, data, callbacks=callbacks, on_epoch=on_epoch, verbose=verbose)

    def tags(self, config: ExperimentConfig) -> dict:
        return {"split_seed": config.split_seed, "validation_folds": self.k}

    def datasets(self, config: ExperimentConfig, data: DigitData) -> tuple[dict, str]:
        # every labelled image is trained on and validated on, in different folds
        return ({"training": (data.train_images, data.train_labels)},
                f"{self.k}folds|{config.split_seed}")

    def log_models(self, result) -> None:
        self.trainer.log_models()

    def scores(self, result) -> dict:
        # the result is scored out of fold (folds.combine)
        return {"oof_accuracy": result.val_accuracy, "oof_crossentropy": result.val_crossentropy}

    def model_names(self, k_names: list[str]) -> list[str]:
        names = [folds.MODEL_NAME.format(i) for i in range(1, self.k + 1)]
        if missing := [n for n in names if n not in k_names]:
            raise UserError(f"validated on {self.k} folds but has no logged model {missing[0]}")
        return names

    def score(self, groups: list[list], data: DigitData, tta: bool,
              weights: list[float] | None = None) -> float:
        oof = folds.oof_probabilities(groups, data, self.k, self.seed, tta, weights)
        return float(np.mean(oof.argmax(1) == data.train_labels))

    def scored_by(self, metric: str) -> str:
        return folds.OOF_METRICS[metric]

    def objective_problem(self, metric: str) -> str | None:
        if metric in folds.OOF_METRICS:
            return None
        return (f"validation.folds scores trials out of fold: objective.metric must be "
                f"{' or '.join(folds.OOF_METRICS)} (got {metric!r})")

    def fingerprint(self) -> dict:
        # trials scored out of fold are not comparable with single-split ones
        return {"folds": self.k}

    def describe(self) -> str:
        return f" (out of fold, {self.k} folds)"

    def version_tags(self) -> dict:
        return {"validation_folds": self.k}

    def options(self) -> list[str]:
        return ["--folds", str(self.k)]

    def study_suffix(self) -> str:
        # a K-fold study of a file is another study than its single-split one (their
        # objectives differ), so by default it gets a name of its own
        return f"-{self.k}fold"

    def short(self) -> str:
        return f" ({self.k}-fold)"

    def for_run(self, label: int | str) -> KFold:
        """A fresh one for one run (it keeps that run's fold models for `log_models`)."""
        return KFold(self.k, self.seed, label)

    def timing_fraction(self, config: ExperimentConfig) -> float:
        return 1 / self.k


@dataclass
class AllImages:
    """Nothing held out: a refit trains on every labelled image."""

    models_per_run = 1

    def check(self, data: DigitData, config: ExperimentConfig) -> None:
        pass

    def fit(self, config, data, callbacks=(), on_epoch=None, verbose="auto"):
        from digitlab import train

        everything = data_mod.Split(data.train_images, data.train_labels,
                                    data.train_images[:0], data.train_labels[:0])
        return train.run(config, data, callbacks=list(callbacks), on_epoch=on_epoch,
                         verbose=verbose, split=everything)

    def tags(self, config: ExperimentConfig) -> dict:
        return {"split_seed": config.split_seed}

    def datasets(self, config: ExperimentConfig, data: DigitData) -> tuple[dict, str]:
        return {"training": (data.train_images, data.train_labels)}, "all"

    log_models = Holdout.log_models
    scores = Holdout.scores
    model_names = Holdout.model_names
    describe = Holdout.describe
    version_tags = Holdout.version_tags


Validation = Holdout | KFold | AllImages


def of(k: int) -> Holdout | KFold:
    """The way a search file's `validation: {folds: K}` (or --folds K) asks for."""
    return KFold(k) if k else Holdout()


def check_folds_option(k: int | None) -> None:
    if k is not None and (k < 0 or k == 1):
        raise UserError("--folds must be at least 2 (0: the search file's validation.folds)")


def from_run(run) -> Holdout | KFold | AllImages:
    """How a trial was validated, from the tags its run recorded (`tags`)."""
    tags = run.data.tags
    if tags.get("refit_of"):
        return AllImages()
    k = int(tags.get("validation_folds") or 0)
    try:
        seed = int(tags["split_seed"])
        return KFold(k, seed) if k else Holdout(float(tags["validation_fraction"]), seed)
    except KeyError:
        raise UserError(f"run {run.info.run_id} records no validation split (tags "
                        "validation_fraction, split_seed): train it again with this version") from None


def from_runs(runs: list) -> Holdout | KFold | AllImages:
    """The one way all `runs` were validated: an ensemble's members must share it, since
    held-out predictions exist only for the same held-out images."""
    ways = [from_run(r) for r in runs]
    if any(w != ways[0] for w in ways[1:]):
        raise UserError("the runs were validated differently "
                        f"({', '.join(sorted({repr(w) for w in ways}))}): an ensemble needs the "
                        "same split or folds; promote them separately")
    return ways[0]
