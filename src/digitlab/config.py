"""Experiment configuration: typed dataclasses, YAML loading and dotted overrides.

An experiment file holds only what differs from the defaults below. Overrides
(`--set model.dropout=0.3`, or a search trial's sampled values) go through the
same checks as the file: unknown keys and wrong types are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from digitlab import resources, typed
from digitlab.errors import ConfigError


@dataclass
class ConvBlock:
    """Convolutions of equal kernel size, then pooling, then the model's conv dropout."""

    filters: list[int]  # one 2D convolution per entry, its number of filters
    kernel_size: int = 3  # square kernel side, in pixels
    pool: str = "max"  # max | avg | none


@dataclass
class ModelConfig:
    blocks: list[ConvBlock] = field(default_factory=list)  # the conv stack; empty: a dense net
    input_padding: int = 0  # zero pixels added on each side (LeNet-5 works on 32x32)
    padding: str = "valid"  # conv padding: valid | same
    activation: str = "relu"  # of every conv and hidden dense layer (a Keras activation name)
    batch_norm: bool = False  # batch normalisation after every conv and hidden dense layer
    width: float = 1.0  # multiplies every conv filter count: the search's conv-width knob
    conv_dropout: float = 0.0  # after every conv block
    dense_units: list[int] = field(default_factory=lambda: [128])  # hidden dense layers
    dropout: float = 0.5  # after every hidden dense layer
    l2: float = 0.0  # kernel regularisation of conv and dense layers


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | rmsprop | sgd
    learning_rate: float = 1e-3  # the initial rate (see training.lr_decay, reduce_lr)
    momentum: float = 0.0  # sgd only


@dataclass
class EarlyStopping:
    enabled: bool = False  # stop when `monitor` has not improved for `patience` epochs
    monitor: str = "val_loss"  # a per-epoch metric, e.g. val_loss, val_accuracy
    patience: int = 5  # epochs without improvement before stopping


@dataclass
class ReduceLROnPlateau:
    enabled: bool = False  # multiply the rate by `factor` when `monitor` stalls
    monitor: str = "val_accuracy"  # a per-epoch metric, e.g. val_accuracy, val_loss
    factor: float = 0.5  # multiplier of the learning rate on a plateau
    patience: int = 3  # epochs without improvement before reducing
    min_lr: float = 1e-5  # the rate never goes below this


@dataclass
class TrainingConfig:
    epochs: int = 10  # epochs to train (a search sets budget.max_epochs)
    batch_size: int = 64  # images per update
    # Images per epoch (rounded up to whole batches), drawn from shuffled passes over the
    # training images, so that N epochs are the same number of updates at any data size;
    # 0: an epoch is one pass. Decay, patience, averaging and pruning rungs count these.
    epoch_images: int = 0
    # The first subset_epochs epochs draw from subset_images training images only, chosen
    # per digit by the split seed (a search's cheap first rungs); 0: all of them throughout.
    subset_images: int = 0
    subset_epochs: int = 0  # how many first epochs draw from the subset (needs epoch_images)
    validation_fraction: float = 0.1  # share of the labelled images held out, per digit
    # seed of the train/validation split; null: the run's seed (a search fixes it, so that
    # trials with their own seeds are still scored on the same images)
    split_seed: int | None = None
    # learning-rate annealer: the rate is multiplied by lr_decay after every epoch (1.0 = off)
    lr_decay: float = 1.0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    reduce_lr: ReduceLROnPlateau = field(default_factory=ReduceLROnPlateau)
    # keep the weights of the best epoch (by val_accuracy), as checkpointing would
    restore_best: bool = False
    # end on the mean of the weights of the last N epochs trained (stochastic weight
    # averaging over the annealed rate's last epochs); 0 or 1: the last epoch's weights
    average_last_epochs: int = 0
    mixed_precision: bool = False  # bfloat16 compute where the CPU has it, float16 on a GPU


@dataclass
class AugmentationConfig:
    enabled: bool = False  # random rotation, zoom and shift of every training image
    rotation: float = 10.0  # degrees
    zoom: float = 0.1  # fraction
    shift: float = 0.1  # fraction of the image size
    # elastic distortion: its strength alpha, in pixels (0 = off; smoothness: elastic_sigma);
    # Simard et al. used alpha 34, sigma 4 on MNIST
    elastic: float = 0.0
    elastic_sigma: float = 4.0  # smoothness sigma of the elastic distortion, in pixels


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # the file name without .yaml; the MLflow run name
    description: str = ""  # one line, shown as the run's description
    seed: int = 42  # initial weights, batch order and augmentation (and the split by default)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    @property
    def split_seed(self) -> int:
        return self.seed if self.training.split_seed is None else self.training.split_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, lists kept whole (what MLflow logs as params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def summary(self) -> str:
        """What this config trains, in a few lines (a run's description in the MLflow UI)."""
        m, o, t, a = self.model, self.optimizer, self.training, self.augmentation
        convs = "; ".join(
            f"conv {'-'.join(str(max(1, round(f * m.width))) for f in b.filters)} "
            f"({b.kernel_size}x{b.kernel_size}{'' if b.pool == 'none' else ', ' + b.pool + ' pool'})"
            for b in m.blocks) or "no convolutions"
        model = (f"{convs}{', batch norm' if m.batch_norm else ''}, conv dropout {m.conv_dropout:.3g}; "
                 f"dense {m.dense_units} with dropout {m.dropout:.3g}; L2 {m.l2:.3g}")
        decay = f", x{t.lr_decay:g} per epoch" if t.lr_decay < 1 else ""
        epoch = f"{t.epoch_images:,} images" if t.epoch_images else "one pass"
        subset = (f" (the first {t.subset_epochs} on {t.subset_images:,} images)"
                  if t.subset_images and t.subset_epochs else "")
        training = (f"{o.name}, learning rate {o.learning_rate:.3g}{decay}; up to {t.epochs} epochs "
                    f"of {epoch}{subset}, batches of {t.batch_size}; "
                    f"{t.validation_fraction:.0%} of the images validate")
        extras = [name for on, name in (
            (t.early_stopping.enabled, f"early stopping on {t.early_stopping.monitor}"),
            (t.reduce_lr.enabled, f"rate halved on a {t.reduce_lr.monitor} plateau"),
            (t.restore_best, "the best epoch's weights"),
            (t.average_last_epochs > 1, f"the mean of the last {t.average_last_epochs} epochs' weights"),
            (t.mixed_precision, "mixed precision")) if on]
        shapes = [f"{k} {v:g}" for k, v in (("rotation", a.rotation), ("zoom", a.zoom),
                                           ("shift", a.shift), ("elastic", a.elastic)) if v]
        augment = f"augmentation: {', '.join(shapes)}" if a.enabled and shapes else "no augmentation"
        return "\n".join([f"**{self.name}** (seed {self.seed})", "", f"- model: {model}",
                          f"- training: {training}" + (f"; {', '.join(extras)}" if extras else ""),
                          f"- {augment}"])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    config = typed.build(ExperimentConfig, data, "")
    validate(config)
    return config


def validate(config: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    m, t, o, a = config.model, config.training, config.optimizer, config.augmentation
    checks = [
        (m.padding in ("valid", "same"), "model.padding must be 'valid' or 'same'"),
        (all(b.pool in ("max", "avg", "none") for b in m.blocks),
         "model.blocks.*.pool must be 'max', 'avg' or 'none'"),
        (all(f > 0 for b in m.blocks for f in b.filters), "conv filters must be positive"),
        (all(b.kernel_size > 0 for b in m.blocks), "model.blocks.*.kernel_size must be positive"),
        (m.width > 0, "model.width must be positive"),
        (0 <= m.dropout < 1 and 0 <= m.conv_dropout < 1, "dropout must be in [0, 1)"),
        (m.l2 >= 0, "model.l2 must be >= 0"),
        (m.input_padding >= 0, "model.input_padding must be >= 0"),
        (all(u > 0 for u in m.dense_units), "model.dense_units must be positive"),
        (o.name in ("adam", "rmsprop", "sgd"), "optimizer.name must be adam, rmsprop or sgd"),
        (o.learning_rate > 0, "optimizer.learning_rate must be positive"),
        (t.epochs >= 1, "training.epochs must be >= 1"),
        (t.batch_size >= 1, "training.batch_size must be >= 1"),
        (min(t.epoch_images, t.subset_images, t.subset_epochs) >= 0,
         "training.epoch_images, subset_images and subset_epochs must be >= 0"),
        (not (t.subset_images and t.subset_epochs) or t.epoch_images,
         "training.subset_images needs training.epoch_images: epochs of a fixed number of "
         "images, the same on the subset and on all images"),
        (0 < t.validation_fraction < 1, "training.validation_fraction must be in (0, 1)"),
        (0 < t.lr_decay <= 1, "training.lr_decay must be in (0, 1]"),
        (t.average_last_epochs >= 0, "training.average_last_epochs must be >= 0"),
        (not (t.restore_best and t.average_last_epochs > 1),
         "training.restore_best and training.average_last_epochs exclude each other: "
         "the one keeps an epoch's weights, the other averages several"),
        (min(a.rotation, a.zoom, a.shift, a.elastic) >= 0, "augmentation strengths must be >= 0"),
        (a.elastic_sigma > 0, "augmentation.elastic_sigma must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{config.name}: {message}")


# --- overrides --------------------------------------------------------------------


def split_overrides(text: str) -> list[str]:
    """The `key=value` pairs of one argument: several may share it, separated by spaces
    (`mlflow run -P set="model.dropout=0.3 training.epochs=5"`); a value may hold spaces
    itself (`model.dense_units=[128, 64]`), so a pair ends only where a dotted key and `=`
    follow."""
    return [p for p in re.split(r"\s+(?=[A-Za-z_][\w.]*=)", text.strip()) if p]


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a YAML value: `model.dropout=0.3`, `model.dense_units=[256]`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: value is not valid YAML") from None
    return key.strip(), value


def apply_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A new config with dotted keys replaced; lists are indexed by number (`blocks.0.filters`)."""
    data = config.to_dict()
    for key, value in overrides.items():
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, dict):
                if part not in node:
                    raise ConfigError(f"override {key!r}: unknown key {here!r}")
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: no item {here!r}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a section")
    return from_dict(data)


# --- experiment files -------------------------------------------------------------


def experiment_path(name_or_path: str) -> Path:
    """An experiment by name (`basic_cnn`: experiments/basic_cnn.yaml here, else the
    shipped copy) or by path."""
    return resources.find("experiments", name_or_path)


def available_experiments() -> list[str]:
    return resources.available("experiments")


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (experiments, search spaces)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_experiment(name_or_path: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    path = experiment_path(name_or_path)
    data = read_mapping(path)
    data.setdefault("name", path.stem)
    try:
        config = from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(config, overrides or {})
