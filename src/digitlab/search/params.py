"""The search file's parameters in each engine's terms: written once for Optuna's
distributions (sampling and the replayed study behind the plots) and KerasTuner's
hyperparameters.

Engines take only scalars as choices, so list values (e.g. dense_units) travel as
JSON text and are decoded before they become config overrides.
"""

from __future__ import annotations

import json
from typing import Any

from digitlab.search.search_file import Param


def encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def rounded(value: Any) -> Any:
    """A sampled float to 4 significant digits, the value the trial then trains with: 0.385
    reads as a hyperparameter, 0.38502080282522677 as noise, and no search resolves the
    difference."""
    if isinstance(value, float) and value != 0:
        return float(f"{value:.4g}")
    return value


def optuna_distribution(p: Param):
    from optuna import distributions as d

    if p.kind == "categorical":
        return d.CategoricalDistribution([encode(c) for c in p.choices])
    if p.kind == "int":
        return d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)


def suggest(trial, p: Param) -> Any:
    """Optuna's value for `p` in this trial (drawn by the study's sampler)."""
    from optuna import distributions as d

    dist = optuna_distribution(p)
    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(p.key, dist.choices)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(p.key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(p.key, dist.low, dist.high, step=dist.step, log=dist.log)


def kerastuner_hyperparameters(params: tuple[Param, ...]):
    import keras_tuner as kt

    hp = kt.HyperParameters()
    for p in params:
        sampling = "log" if p.log else "linear"
        if p.kind == "categorical":
            hp.Choice(p.key, [encode(c) for c in p.choices])
        elif p.kind == "int":
            hp.Int(p.key, int(p.low), int(p.high), step=int(p.step) if p.step else None,
                   sampling=sampling)
        else:
            hp.Float(p.key, p.low, p.high, step=p.step, sampling=sampling)
    return hp
