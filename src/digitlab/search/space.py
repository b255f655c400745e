"""Search-space files (`search/*.yaml`): one format for both engines.

A file names the experiment(s), the objective, the budget, engine options, how
trials are validated (one split, or `validation: {folds: K}`) and the space: dotted config keys mapped to int, float (optionally log) or
categorical ranges, and optionally where to start: values for the first trial
of a new study. With several experiments, the architecture itself is a
categorical parameter named `experiment`. Everything is checked here, before
any run or study exists.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from digitlab import config as config_mod
from digitlab import resources, validation
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
class StudyFile:
    path: str
    experiments: tuple[str, ...]
    description: str = ""
    metric: str = "val_accuracy"
    direction: str = "maximize"
    trials: int = 10
    max_epochs: int = 10
    # wall-clock minutes per `digitlab search` invocation; no trial starts after them
    minutes: float | None = None
    # budget.epoch_images / subset_images / subset_epochs: training.* of every trial (0: the
    # experiment's own): epochs of a fixed number of images, the first ones on a subset
    epoch_images: int = 0
    subset_images: int = 0
    subset_epochs: int = 0
    sampler: str = "tpe"
    pruner: str = "hyperband"
    min_epochs: int = 1  # epochs every Optuna trial trains before it can be pruned
    tuner: str = "hyperband"
    max_consecutive_failures: int = 3
    folds: int = 0  # validation.folds: K-fold validation with K >= 2; 0: one validation split
    fixed: dict = field(default_factory=dict)  # overrides applied to every trial
    params: tuple[Param, ...] = ()
    # Values for the first trial of a new study (e.g. a known-good recipe), so a short
    # search starts from it instead of from a random draw; the engine samples the rest.
    # Not part of the fingerprint: it only matters when the study is created.
    start: dict = field(default_factory=dict)
    # Retrain the best trial on every labelled image when the search ends (`promote --refit`)
    refit: bool = False

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def validation(self) -> validation.Holdout | validation.KFold:
        """How every trial is validated: one split, or `validation.folds` folds."""
        return validation.of(self.folds)

    @property
    def scored_by(self) -> str:
        """The metric trials are ranked by: the objective's, out of fold in a K-fold study."""
        return self.validation.scored_by(self.metric)

    def fingerprint(self) -> str:
        """What a resumed study must share with the original: experiments, space, objective."""
        data = {
            "experiments": self.experiments,
            "metric": self.metric,
            "direction": self.direction,
            "fixed": self.fixed,
            "params": [asdict(p) for p in self.params],
        }
        data.update(self.validation.fingerprint())
        # Set only when used, so that studies made before these settings existed resume.
        data.update(self.lengths())
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def lengths(self) -> dict[str, int]:
        """The budget's training.* settings of epoch length and subset rungs that it sets."""
        return {f"training.{k}": v for k in ("epoch_images", "subset_images", "subset_epochs")
                if (v := getattr(self, k))}

    def overrides(self, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Sampled values -> (experiment name, config overrides) for `train.run`."""
        values = dict(values)
        experiment = values.pop(ARCHITECTURE_KEY, self.experiments[0])
        overrides = {**self.fixed, **self.lengths(), **values, "training.epochs": self.max_epochs}
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
         folds: int | None = None) -> StudyFile:
    """A search file by name (`quick`) or path, found as `resources.find` finds it.

    `budget_overrides` (trials, max_epochs, minutes from the command line) and `folds`
    (--folds) replace the file's values before the checks, so they meet the same rules.
    """
    path = resources.find("search", str(name_or_path))
    raw = config_mod.read_mapping(path)
    known_sections = {"description", "experiments", "experiment", "objective", "budget", "optuna",
                      "kerastuner", "fixed", "space", "start", "max_consecutive_failures", "validation",
                      "refit"}
    unknown = sorted(set(raw) - known_sections)
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}")

    experiments = raw.get("experiments", raw.get("experiment"))
    if isinstance(experiments, str):
        experiments = [experiments]
    if not isinstance(experiments, list) or not experiments:
        raise ConfigError(f"{path}: 'experiments' must name one experiment or a list of them")
    objective = raw.get("objective") or {}
    budget = raw.get("budget") or {}
    if isinstance(budget, dict) and budget_overrides:
        budget = {**budget, **budget_overrides}
    optuna_opts = raw.get("optuna") or {}
    kt_opts = raw.get("kerastuner") or {}
    fixed = raw.get("fixed") or {}
    space = raw.get("space") or {}
    start = raw.get("start") or {}
    validation_section = raw.get("validation") or {}
    for name, section in (("objective", objective), ("budget", budget), ("optuna", optuna_opts),
                          ("kerastuner", kt_opts), ("fixed", fixed), ("space", space), ("start", start),
                          ("validation", validation_section)):
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {name} must be a mapping")
    budget_keys = {"trials", "max_epochs", "minutes", "epoch_images", "subset_images", "subset_epochs"}
    if unknown := sorted(set(budget) - budget_keys):
        raise ConfigError(f"{path}: unknown option budget.{unknown[0]} (known: {', '.join(sorted(budget_keys))})")
    folds = validation.folds_of(validation_section, folds, path)

    params = [_param(k, v, f"{path}: space.{k}") for k, v in space.items()]
    if len(experiments) > 1:
        if ARCHITECTURE_KEY in space:
            raise ConfigError(f"{path}: space.{ARCHITECTURE_KEY} is implied by the experiments list")
        params.insert(0, Param(ARCHITECTURE_KEY, "categorical", choices=tuple(experiments)))

    result = StudyFile(
        path=str(path),
        experiments=tuple(experiments),
        description=str(raw.get("description") or ""),
        metric=objective.get("metric", "val_accuracy"),
        direction=objective.get("direction", "maximize"),
        trials=budget.get("trials", 10),
        max_epochs=budget.get("max_epochs", 10),
        minutes=budget.get("minutes"),
        epoch_images=budget.get("epoch_images", 0),
        subset_images=budget.get("subset_images", 0),
        subset_epochs=budget.get("subset_epochs", 0),
        sampler=optuna_opts.get("sampler", "tpe"),
        pruner=optuna_opts.get("pruner", "hyperband"),
        min_epochs=optuna_opts.get("min_epochs", 1),
        tuner=kt_opts.get("tuner", "hyperband"),
        max_consecutive_failures=raw.get("max_consecutive_failures", 3),
        folds=folds,
        fixed=dict(fixed),
        params=tuple(params),
        start=dict(start),
        refit=raw.get("refit", False),
    )
    _check(result)
    return result


def _check(s: StudyFile) -> None:
    p = s.path
    checks = [
        (s.metric in OBJECTIVE_METRICS,
         f"objective.metric must be one of {', '.join(OBJECTIVE_METRICS)} (got {s.metric!r})"),
        (s.direction in ("maximize", "minimize"), "objective.direction must be maximize or minimize"),
        (isinstance(s.trials, int) and s.trials >= 1, "budget.trials must be a positive integer"),
        (isinstance(s.max_epochs, int) and s.max_epochs >= 1,
         "budget.max_epochs must be a positive integer"),
        (s.minutes is None or (isinstance(s.minutes, (int, float)) and not isinstance(s.minutes, bool)
                               and s.minutes > 0),
         "budget.minutes must be a positive number"),
        (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
             for v in (s.epoch_images, s.subset_images, s.subset_epochs)),
         "budget.epoch_images, subset_images and subset_epochs must be whole numbers >= 0"),
        (not (s.subset_images and s.subset_epochs) or s.epoch_images,
         "budget.subset_images needs budget.epoch_images (epochs of a fixed number of images)"),
        (isinstance(s.refit, bool), "refit must be true or false"),
        (s.sampler in OPTUNA_SAMPLERS, f"optuna.sampler must be one of {', '.join(OPTUNA_SAMPLERS)}"),
        (s.pruner in OPTUNA_PRUNERS, f"optuna.pruner must be one of {', '.join(OPTUNA_PRUNERS)}"),
        (isinstance(s.min_epochs, int) and 1 <= s.min_epochs <= s.max_epochs,
         "optuna.min_epochs must be an integer from 1 to budget.max_epochs"),
        (s.tuner in KERASTUNER_TUNERS, f"kerastuner.tuner must be one of {', '.join(KERASTUNER_TUNERS)}"),
        (isinstance(s.max_consecutive_failures, int) and s.max_consecutive_failures >= 1,
         "max_consecutive_failures must be a positive integer"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{p}: {message}")
    if problem := s.validation.objective_problem(s.metric):
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
