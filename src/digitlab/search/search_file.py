"""Search files (`search/*.yaml`): one format for both engines.

A file names the experiment(s), the objective, the budget, engine options, how trials
are validated (`validation: {kind: kfold, folds: K}`; none: one split) and the space: dotted config keys
mapped to int, float (optionally log) or categorical ranges, and optionally where to
start: values for the first trial of a new study. With several experiments, the
architecture itself is a categorical parameter named `experiment`.

The file is built like an experiment file: typed dataclasses (their defaults are the
only ones) built with `typed.build`, so an unknown key or a wrong type is a one-line
error; `_check` adds what types cannot say. Everything is checked here, before any run
or study exists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from digitlab import config as config_mod
from digitlab import resources, typed
from digitlab import validation as validation_mod
from digitlab.errors import ConfigError
from digitlab.metrics import OBJECTIVE_METRICS

ARCHITECTURE_KEY = "experiment"
OPTUNA_SAMPLERS = ("tpe", "random")
OPTUNA_PRUNERS = ("hyperband", "median", "none")
KERASTUNER_TUNERS = ("hyperband", "random", "bayesian")


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclass(frozen=True)
class Objective:
    # what trials are ranked by: loss, accuracy, crossentropy, val_loss, val_accuracy or
    # val_crossentropy (out of fold in a K-fold study)
    metric: str = "val_accuracy"
    direction: str = "maximize"  # maximize | minimize


@dataclass(frozen=True)
class Budget:
    trials: int = 10  # trials in all, shared by every worker (--trials)
    max_epochs: int = 10  # epochs per trial at most: Hyperband's largest rung (--max-epochs)
    # the whole job's time, trials and final training together (--minutes): the plan splits
    # it, and no trial or final model starts that it says cannot end in time; null: the
    # trials get search_minutes (or no limit) and final training its planned length
    minutes: float | None = None
    # with no `minutes`: the trials' time; none starts that cannot end within it
    search_minutes: float | None = None
    # training.epoch_images of every trial: an epoch is this many images, at any data size;
    # 0: each experiment's own
    epoch_images: int = 0
    # the first subset_epochs epochs of every trial draw from this many training images
    # (one subset, the same for every trial); 0: all images throughout
    subset_images: int = 0
    subset_epochs: int = 0  # epochs drawn from the subset (needs epoch_images)


@dataclass(frozen=True)
class FinalTraining:
    # models trained on every labelled image once the trials end: the best trials'
    # configurations in rank order, then other seeds of the best; `digitlab promote`
    # registers them, averaged. 0: no final stage (promote registers trials). With
    # budget.minutes, as many as final.share of it fits (at least one)
    models: int = 0
    # the length of each, in passes over every labelled image; never shorter than a full
    # trial (on small data a trial is the longer); 0: a full trial's length
    passes: float = 0.0
    # with budget.minutes: the largest share of it that final training takes
    share: float = 0.5


@dataclass(frozen=True)
class OptunaOptions:
    sampler: str = "tpe"  # tpe | random
    pruner: str = "hyperband"  # hyperband | median | none
    min_epochs: int = 1  # epochs every trial trains before it can be pruned


@dataclass(frozen=True)
class KerasTunerOptions:
    tuner: str = "hyperband"  # hyperband | random | bayesian


@dataclass(frozen=True)
class StudyFile:
    # one experiment or a list of them; with several, the architecture is a categorical
    # parameter named `experiment`
    experiments: list[str]
    description: str = ""  # what the study is for (free text; the parent run's description)
    objective: Objective = field(default_factory=Objective)
    budget: Budget = field(default_factory=Budget)
    optuna: OptunaOptions = field(default_factory=OptunaOptions)
    kerastuner: KerasTunerOptions = field(default_factory=KerasTunerOptions)
    # how every trial is validated: {kind: holdout | kfold | repeated, and the kind's
    # parameters} (digitlab.validation); {}: the experiment's own split
    validation: dict[str, Any] = field(default_factory=dict)
    max_consecutive_failures: int = 3  # this many failed trials in a row stop the search
    refit: bool = False  # retrain the best trial on every labelled image when the search ends
    final: FinalTraining = field(default_factory=FinalTraining)  # the final stage (final models)
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted config keys set in every trial
    # values for the first trial of a new study (keys of `space`), e.g. a known-good
    # recipe, so a short search starts from it; not part of the fingerprint: it only
    # matters when the study is created
    start: dict[str, Any] = field(default_factory=dict)
    # dotted config keys -> ranges: {type: int | float, low, high, step or log: true} or
    # {type: categorical, choices: [...]}
    space: dict[str, Any] = field(default_factory=dict)
    path: str = field(default="", metadata={typed.NOT_A_KEY: True})  # where it was read from

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @functools.cached_property
    def params(self) -> tuple[Param, ...]:
        """The space's ranges, with the architecture first when there are several."""
        params = [_param(k, v, f"{self.path}: space.{k}") for k, v in self.space.items()]
        if len(self.experiments) > 1:
            params.insert(0, Param(ARCHITECTURE_KEY, "categorical", choices=tuple(self.experiments)))
        return tuple(params)

    @functools.cached_property
    def validator(self) -> validation_mod.Validation:
        """How every trial is validated (the `validation` section, checked on loading)."""
        return validation_mod.from_spec(self.validation)

    @property
    def scored_by(self) -> str:
        """The metric trials are ranked by: the objective's, out of fold in a K-fold study."""
        return self.validator.scored_by(self.objective.metric)

    def fingerprint(self) -> str:
        """What a resumed study must share with the original: experiments, space, objective."""
        data = {
            "experiments": self.experiments,
            "metric": self.objective.metric,
            "direction": self.objective.direction,
            "fixed": self.fixed,
            "params": [asdict(p) for p in self.params],
        }
        data.update(self.validator.fingerprint())
        # Set only when used, so that studies made before these settings existed resume.
        data.update(self.lengths())
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def lengths(self) -> dict[str, int]:
        """The budget's training.* settings of epoch length and subset rungs that it sets."""
        return {f"training.{k}": v for k in ("epoch_images", "subset_images", "subset_epochs")
                if (v := getattr(self.budget, k))}

    def overrides(self, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Sampled values -> (experiment name, config overrides) for `train.run`."""
        values = dict(values)
        experiment = values.pop(ARCHITECTURE_KEY, self.experiments[0])
        overrides = {**self.fixed, **self.lengths(), **values, "training.epochs": self.budget.max_epochs}
        return experiment, overrides

    def trial_config(self, values: dict[str, Any], seed: int, number: int = 0,
                     epochs: int | None = None):
        """Trial `number` of a study with `seed`: every trial is scored on the study seed's
        validation split (or its K folds), and trains from its own seed (seed + number): its own initial
        weights, batch order and augmentation: models that differ only in hyperparameters
        but share a seed make the same mistakes, which leaves an ensemble of them nothing
        to average out."""
        experiment, overrides = self.overrides(values)
        if epochs is not None:
            overrides["training.epochs"] = epochs
        overrides["seed"] = seed + number
        overrides["training.split_seed"] = seed
        return config_mod.load_experiment(experiment, overrides)


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: expected a mapping with 'type' (int, float or categorical)")
    kind = spec["type"]
    allowed = {"int": {"low", "high", "step", "log"}, "float": {"low", "high", "step", "log"},
               "categorical": {"choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: type {kind!r} is not int, float or categorical")
    unknown = sorted(set(spec) - allowed[kind] - {"type"})
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        return Param(key, kind, choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: {kind} needs numeric low and high") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: low and high must be finite numbers")
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if low > high:
        raise ConfigError(f"{where}: low {low:g} is greater than high {high:g}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0")
    if log and step is not None:
        raise ConfigError(f"{where}: step and log cannot be combined")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: int bounds must be whole numbers")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise ConfigError(f"{where}: step must be a positive number")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _contains(p: Param, value: Any) -> bool:
    """Whether the engines could draw `value` from the range (used for start values)."""
    if p.kind == "categorical":
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if p.kind == "int" and not float(value).is_integer():
        return False
    if not p.low <= value <= p.high:
        return False
    steps = (value - p.low) / p.step if p.step else 0.0
    return abs(steps - round(steps)) < 1e-9


def _samples(p: Param) -> list[Any]:
    """Values at the edges of a range, used to check that the config accepts them."""
    if p.kind == "categorical":
        return list(p.choices)
    if p.kind == "int":
        return [int(p.low), int(p.high)]
    return [p.low, p.high]


def load(name_or_path: str | Path, budget_overrides: dict[str, Any] | None = None,
         validation: dict | None = None) -> StudyFile:
    """A search file by name (`quick`) or path, found as `resources.find` finds it.

    `budget_overrides` (trials, max_epochs, minutes from the command line) and `validation`
    (--validation, --folds) replace the file's values before the checks, so they meet the
    same rules.
    """
    path = resources.find("search", str(name_or_path))
    # An empty section (`fixed:` with nothing under it) is the same as none.
    raw = {k: v for k, v in config_mod.read_mapping(path).items() if v is not None}
    if "experiment" in raw and "experiments" not in raw:  # one experiment, by the singular
        raw["experiments"] = raw.pop("experiment")
    if isinstance(raw.get("experiments"), str):
        raw["experiments"] = [raw["experiments"]]
    given = {k: v for k, v in (budget_overrides or {}).items() if v is not None}
    if given and isinstance(raw.get("budget", {}), dict):
        raw["budget"] = {**raw.get("budget", {}), **given}
    if validation:
        raw["validation"] = validation
    try:
        study_file = typed.build(StudyFile, raw, "")
    except ConfigError as exc:  # "budget.trials: expected int, ..." / ": unknown key ..."
        raise ConfigError(f"{path}: {str(exc).removeprefix(': ')}") from None
    study_file = replace(study_file, path=str(path))
    _check(study_file)
    return study_file


def _check(s: StudyFile) -> None:
    """What the types cannot say: allowed values, ranges, and keys the experiments have."""
    p, b = s.path, s.budget
    checks = [
        (bool(s.experiments), "experiments must name one experiment or a list of them"),
        (s.objective.metric in OBJECTIVE_METRICS,
         f"objective.metric must be one of {', '.join(OBJECTIVE_METRICS)} (got {s.objective.metric!r})"),
        (s.objective.direction in ("maximize", "minimize"),
         "objective.direction must be maximize or minimize"),
        (b.trials >= 1, "budget.trials must be a positive integer"),
        (b.max_epochs >= 1, "budget.max_epochs must be a positive integer"),
        (b.minutes is None or b.minutes > 0, "budget.minutes must be a positive number"),
        (b.search_minutes is None or b.search_minutes > 0,
         "budget.search_minutes must be a positive number"),
        (s.final.models >= 0, "final.models must be a whole number >= 0"),
        (s.final.passes >= 0, "final.passes must be a number >= 0"),
        (0 < s.final.share < 1, "final.share must be a number between 0 and 1"),
        (not (s.refit and s.final.models), "refit: true and final.models are two final stages: "
                                            "keep one (final.models: 1 with final.passes: 0 is the refit)"),
        (min(b.epoch_images, b.subset_images, b.subset_epochs) >= 0,
         "budget.epoch_images, subset_images and subset_epochs must be whole numbers >= 0"),
        (not (b.subset_images and b.subset_epochs) or b.epoch_images,
         "budget.subset_images needs budget.epoch_images (epochs of a fixed number of images)"),
        (s.optuna.sampler in OPTUNA_SAMPLERS,
         f"optuna.sampler must be one of {', '.join(OPTUNA_SAMPLERS)}"),
        (s.optuna.pruner in OPTUNA_PRUNERS, f"optuna.pruner must be one of {', '.join(OPTUNA_PRUNERS)}"),
        (1 <= s.optuna.min_epochs <= b.max_epochs,
         "optuna.min_epochs must be an integer from 1 to budget.max_epochs"),
        (s.kerastuner.tuner in KERASTUNER_TUNERS,
         f"kerastuner.tuner must be one of {', '.join(KERASTUNER_TUNERS)}"),
        (s.max_consecutive_failures >= 1, "max_consecutive_failures must be a positive integer"),
        (ARCHITECTURE_KEY not in s.space or len(s.experiments) < 2,
         f"space.{ARCHITECTURE_KEY} is implied by the experiments list"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{p}: {message}")
    try:
        validator = s.validator
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if problem := validator.objective_problem(s.objective.metric):
        raise ConfigError(f"{p}: {problem}")
    params = {param.key: param for param in s.params}
    for key, value in s.start.items():
        if key not in params:
            raise ConfigError(f"{p}: start.{key} is not a parameter of the space")
        if not _contains(params[key], value):
            raise ConfigError(f"{p}: start.{key} = {value!r} is not a value of space.{key}")
    # Every key must exist in every experiment and accept both ends of its range.
    for experiment in s.experiments:
        base = config_mod.load_experiment(experiment, s.fixed)
        for param in s.params:
            if param.key == ARCHITECTURE_KEY:
                continue
            for value in _samples(param):
                try:
                    config_mod.apply_overrides(base, {param.key: value})
                except ConfigError as exc:
                    raise ConfigError(f"{p}: space.{param.key} on {experiment}: {exc}") from None
