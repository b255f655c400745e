"""How a run is validated, as one object of one of the KINDS below. Like scikit-learn's
splitters, a kind is a name, its parameters and the splits it makes of the labelled images
(train and held-out rows, one pair per model a run trains), plus whether its held-out
predictions cover every image; everything else (fitting, tags, fingerprint, the study's
suffix and option, ranking, the models a run logs, an ensemble's score) is derived from
those in `base.Validation` and `fitter`. The tracked-run path, the search and the
registry hold one and never ask which kind it is.

A search file states it as `validation: {kind: kfold, folds: 5}` (`{folds: 5}` alone is
K folds too); `digitlab search --validation kfold:folds=5` or its shorthand `--folds 5`
replace the file's. A run's is rebuilt from its tags (`from_run`), runs made before the
kind was tagged included.
"""

from __future__ import annotations

import dataclasses

import yaml

from digitlab import typed
from digitlab.errors import ConfigError, UserError
from digitlab.validation.base import OOF_METRICS, Validation
from digitlab.validation.holdout import Holdout
from digitlab.validation.kfold import KFold
from digitlab.validation.none import AllImages
from digitlab.validation.repeated import RepeatedHoldout

KINDS: dict[str, type[Validation]] = {
    cls.kind: cls for cls in (Holdout, KFold, RepeatedHoldout, AllImages)}

__all__ = ["KINDS", "OOF_METRICS", "AllImages", "Holdout", "KFold", "RepeatedHoldout", "Validation",
           "default", "from_option", "from_run", "from_runs", "from_spec"]


def default() -> Validation:
    """The experiment's own split (`training.validation_fraction`, `split_seed`)."""
    return Holdout()


def from_spec(spec: dict, where: str = "validation") -> Validation:
    """A search file's `validation:` section; ConfigError names the key that is wrong."""
    spec = dict(spec or {})
    if "kind" not in spec and spec.get("folds") == 0:  # before kinds, `folds: 0` was one split
        spec.pop("folds")
    kind = spec.pop("kind", "kfold" if "folds" in spec else "holdout")
    if kind not in KINDS or not KINDS[kind].holds_out:
        known = ", ".join(k for k, c in KINDS.items() if c.holds_out)
        raise ConfigError(f"{where}.kind must be one of {known} (got {kind!r})")
    scheme = typed.build(KINDS[kind], spec, where)
    if problems := scheme.problems():
        raise ConfigError(f"{where}.{problems[0]}")
    return scheme


def from_option(text: str | None, folds: int | None = None) -> dict | None:
    """`--validation KIND[:NAME=VALUE,...]` or `--folds K` as a search file's section, None
    when neither is given; a bad one is one line (UserError)."""
    if folds is not None and (folds < 0 or folds == 1):
        raise UserError("--folds must be at least 2 (0: the search file's validation)")
    if folds:
        return {"kind": "kfold", "folds": folds}
    if not text:
        return None
    kind, _, rest = text.partition(":")
    spec = {"kind": kind}
    for pair in filter(None, rest.split(",")):
        name, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--validation {text}: expected KIND:NAME=VALUE,... (e.g. kfold:folds=5)")
        spec[name.strip()] = yaml.safe_load(value)
    try:
        from_spec(spec)
    except ConfigError as exc:
        raise UserError(f"--validation {text}: {exc}") from None
    return spec


def from_tags(tags: dict, run_id: str = "") -> Validation:
    """How a run was validated, from the tags it recorded (`Validation.tags`). Runs made
    before the kind was tagged: a refit held nothing out, `validation_folds` meant K folds,
    anything else one holdout."""
    if "validation" in tags:
        kind = tags["validation"]
    elif tags.get("refit_of"):
        kind = "none"
    else:
        kind = "kfold" if tags.get("validation_folds") else "holdout"
    if kind not in KINDS:
        raise UserError(f"run {run_id} was validated as {kind!r}, which this version does not know")
    cls = KINDS[kind]
    try:
        values = {f.name: yaml.safe_load(tags[f"validation_{f.name}"])
                  for f in dataclasses.fields(cls) if not f.metadata.get(typed.NOT_A_KEY)}
        return cls(**values, seed=int(tags["split_seed"]))
    except KeyError:
        raise UserError(f"run {run_id} records no validation split (tags validation_fraction, "
                        "split_seed): train it again with this version") from None


def from_run(run) -> Validation:
    return from_tags(run.data.tags, run.info.run_id)


def from_runs(runs: list) -> Validation:
    """The one way all `runs` were validated: an ensemble's members must share it, since
    held-out predictions exist only for the same held-out images."""
    ways = [from_run(r) for r in runs]
    if any(w != ways[0] for w in ways[1:]):
        raise UserError("the runs were validated differently "
                        f"({', '.join(sorted({repr(w) for w in ways}))}): an ensemble needs the "
                        "same split or folds; promote them separately")
    return ways[0]
