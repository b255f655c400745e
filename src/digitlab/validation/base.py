"""The contract every kind of validation keeps, and everything derived from it.

A kind is a frozen dataclass: its `kind` name, its parameters (the dataclass fields, as a
search file gives them), `splits` (train and held-out row indices of the labelled images,
one pair per model a run trains) and `check` (the data can be validated this way). The
rest is derived here, once, from those: the run's tags and their reading back, the
study's fingerprint, suffix, description and command-line option, the metric trials are
ranked by, the models a run logs, and the score of an ensemble on what it held out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from digitlab import data as data_mod
from digitlab import typed
from digitlab.errors import UserError

# The objective of a run that trains several models, by the search file's metric: the same
# measure taken on the held-out predictions pooled over its splits ("out of fold"). Other
# metrics (loss, val_loss, ...) are per-epoch values of one training and have no pooled
# counterpart.
OOF_METRICS = {"val_accuracy": "oof_accuracy", "val_crossentropy": "oof_crossentropy"}
MODEL_NAME = "fold_{}"  # the logged model of split i (from 1) of a run of several


def seed_field():
    """The split seed: the config's (`split_seed`) unless given, as a registry rebuilding
    a run's validation from its tags gives it. Not a key of the search file."""
    return dataclasses.field(default=None, kw_only=True, metadata={typed.NOT_A_KEY: True})


@dataclasses.dataclass(frozen=True)
class Validation:
    """Base of the kinds (`digitlab.validation.KINDS`)."""

    kind: ClassVar[str]
    # e.g. "{folds}-fold" and "{folds}fold", from the parameters: the study's label in
    # prose and its name's suffix; "" for the default kind, which adds nothing to either
    # (nor an option to the reproduce command)
    label_format: ClassVar[str] = ""
    suffix_format: ClassVar[str] = ""
    # whether the held-out predictions cover every labelled image (K folds do)
    covers_every_image: ClassVar[bool] = False
    holds_out: ClassVar[bool] = True  # False: trained on every labelled image (final models)

    # -- what each kind defines ----------------------------------------------------------
    @property
    def n_splits(self) -> int:
        """Models a run trains: one per split."""
        raise NotImplementedError

    def index_splits(self, labels: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train rows, held-out rows) of each split, by the seed."""
        raise NotImplementedError

    def check_data(self, data: data_mod.DigitData) -> None:
        """Raise DataError unless `data` can be validated this way (parameters resolved)."""

    def problems(self) -> list[str]:
        """What is wrong with the parameters, as `name must ...` phrases."""
        return []

    def with_config(self, config) -> Validation:
        """Parameters the config supplies when not given (a holdout's fraction)."""
        return self

    # -- derived -------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get(typed.NOT_A_KEY)}

    def resolved(self, config) -> Validation:
        """Every parameter and the seed set, from `config` where this one leaves them open."""
        out = self.with_config(config) if config is not None else self
        if out.seed is None:
            out = dataclasses.replace(out, seed=config.split_seed)
        return out

    def check(self, data, config) -> None:
        """Raise DataError unless `data` can be validated this way, before anything is
        written."""
        self.resolved(config).check_data(data)

    def splits(self, labels: np.ndarray, config=None) -> list[tuple[np.ndarray, np.ndarray]]:
        out = self.resolved(config)
        return out.index_splits(labels, out.seed)

    def fit(self, config, data, callbacks=(), on_epoch=None, verbose="auto", label=""):
        from digitlab.validation import fitter

        return fitter.fit(self.resolved(config), config, data, callbacks, on_epoch, verbose, label)

    def tags(self, config) -> dict:
        """What a run records, enough for `from_tags` to rebuild this validation."""
        out = self.resolved(config)
        return {"validation": self.kind, "split_seed": out.seed,
                **{f"validation_{k}": v for k, v in out.parameters().items() if v is not None}}

    def version_tags(self) -> dict:
        return {"validation": self.kind,
                **{f"validation_{k}": v for k, v in self.parameters().items() if v is not None}}

    def datasets(self, config, data) -> tuple[dict, str]:
        """The MLflow datasets of a run and the key naming its split: one split's training
        and held-out images, or every labelled image when there are several splits (or
        nothing held out)."""
        out = self.resolved(config)
        key = "|".join([self.kind, *map(str, out.parameters().values()), str(out.seed)])
        if self.n_splits == 1 and self.holds_out:
            train_rows, held = out.index_splits(data.train_labels, out.seed)[0]
            return ({"training": (data.train_images[train_rows], data.train_labels[train_rows]),
                     "validation": (data.train_images[held], data.train_labels[held])}, key)
        return {"training": (data.train_images, data.train_labels)}, key

    def label(self) -> str:
        return self.label_format.format(**self.parameters())

    def describe(self) -> str:
        if not self.label_format:
            return ""
        return f" ({self.label()}, scored out of fold)" if self.n_splits > 1 else f" ({self.label()})"

    def metric_note(self) -> str:
        return f" ({self.label()})" if self.label_format else ""

    def study_suffix(self) -> str:
        # another kind of validation is another study (its objective differs), so by
        # default it gets a name of its own
        return "-" + self.suffix_format.format(**self.parameters()) if self.suffix_format else ""

    def fingerprint(self) -> dict:
        return {k: v for k, v in self.parameters().items() if v is not None}

    def command_options(self) -> list[str]:
        """The `digitlab search` option that asks for this validation ([] for the default)."""
        if not self.label_format:
            return []
        return ["--validation", f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.parameters().items())]

    def scored_by(self, metric: str) -> str:
        return OOF_METRICS[metric] if self.n_splits > 1 else metric

    def objective_problem(self, metric: str) -> str | None:
        if self.n_splits == 1 or metric in OOF_METRICS:
            return None
        return (f"validation {self.kind} scores trials out of fold: objective.metric must be "
                f"{' or '.join(OOF_METRICS)} (got {metric!r})")

    def scores(self, result) -> dict:
        if self.n_splits == 1:
            return {}
        return {"oof_accuracy": result.val_accuracy, "oof_crossentropy": result.val_crossentropy}

    def model_names(self, logged: list[str]) -> list[str]:
        if self.n_splits == 1:
            return logged[:1]
        names = [MODEL_NAME.format(i) for i in range(1, self.n_splits + 1)]
        if missing := [n for n in names if n not in logged]:
            raise UserError(f"validated on {self.n_splits} splits but has no logged model {missing[0]}")
        return names

    def log_models(self, result) -> None:
        from digitlab.validation import fitter

        fitter.log_models(self, result)

    def score(self, groups: list[list], data, tta: bool, weights: list[float] | None = None) -> float:
        """An ensemble's accuracy on what its members held out: `groups[m][i]` is member
        m's model of split i; each held-out image is predicted by the models that held it
        out, as served (pooled over the splits that held it out)."""
        from digitlab.validation import fitter

        return fitter.held_out_accuracy(self, groups, data, tta, weights)
