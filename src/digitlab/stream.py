"""What a training run sees, batch by batch: its epochs and the images each one draws from.

Keras counts training in epochs of one pass over the training images, so the same 40
epochs are eight times the updates on Kaggle's 42,000 images that they are on 5,000. Two
settings of `training` make length mean the same at any size:

- `epoch_images: N`: every epoch is N images (rounded up to whole batches) taken from
  shuffled passes over the training images, however many there are. Everything counted in
  epochs (the learning-rate annealer, plateau and early-stopping patience, weight
  averaging, a search's pruning rungs) then counts images too. 0: Keras's epoch, one pass.
- `subset_images: S` with `subset_epochs: E`: epochs 1..E draw from S training images only,
  chosen per digit by the split seed, so every trial of a study (which shares that seed)
  is judged on the same small set at its first rungs; a trial that trains past epoch E
  draws from all of them. Optuna's and KerasTuner's pruners count steps, not images, so
  this second axis of fidelity is ours: the rungs stay theirs.

The order is drawn once, by the run's seed, as one index array for the whole run: the
same batches on every backend, and a run records exactly how many images it saw.
Imports no backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted row indices of `size` images, each digit keeping its share (at least one image
    of every digit present): the same rows for the same labels and seed."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, size])
    classes, counts = np.unique(labels, return_counts=True)
    # Largest remainders: shares that add up to `size` exactly.
    exact = counts * size / len(labels)
    take = np.maximum(1, np.floor(exact).astype(int))
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[: max(0, size - take.sum())]:
        take[i] += 1
    parts = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(parts))


@dataclass(frozen=True)
class Feed:
    """The batches of one run: `order` lists the training rows in the order they are fed."""

    order: np.ndarray  # int32 row indices, epochs x steps_per_epoch x batch_size of them
    steps_per_epoch: int
    batch_size: int
    train_size: int  # training images in all
    subset_size: int  # images the first `subset_epochs` epochs draw from (train_size: all)
    subset_epochs: int

    @property
    def epoch_images(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def pool(self, epochs: int) -> int:
        """How many distinct images a run that trained `epochs` epochs drew from."""
        return self.subset_size if epochs <= self.subset_epochs else self.train_size


def feed(labels: np.ndarray, training, seed: int, split_seed: int) -> Feed | None:
    """The feed of a run with `training` settings (config.training) on these training
    labels; None when epochs are plain passes (epoch_images 0), which Keras feeds itself."""
    if not training.epoch_images:
        return None
    n, batch = len(labels), training.batch_size
    steps = math.ceil(training.epoch_images / batch)
    per_epoch = steps * batch
    subset_epochs = min(training.subset_epochs, training.epochs) if training.subset_images else 0
    subset = stratified_subset(labels, training.subset_images, split_seed) if subset_epochs else None
    if subset is not None and len(subset) >= n:
        subset, subset_epochs = None, 0  # the subset is every image: no second phase
    rng = np.random.default_rng(seed)

    def passes(rows: np.ndarray, count: int) -> np.ndarray:
        """`count` rows from shuffled passes over `rows`, a new order every pass."""
        out = [rng.permutation(rows) for _ in range(math.ceil(count / len(rows)))]
        return np.concatenate(out)[:count] if out else rows[:0]

    everything = np.arange(n)
    first = passes(subset, subset_epochs * per_epoch) if subset is not None else everything[:0]
    rest = passes(everything, (training.epochs - subset_epochs) * per_epoch)
    return Feed(order=np.concatenate([first, rest]).astype(np.int32), steps_per_epoch=steps,
                batch_size=batch, train_size=n,
                subset_size=len(subset) if subset is not None else n, subset_epochs=subset_epochs)


def images_seen(feed: Feed | None, epochs: int, train_size: int) -> int:
    """Training images fed in `epochs` epochs (counted again each time one comes back)."""
    return epochs * (feed.epoch_images if feed else train_size)
