"""Figures logged with every run: curves, confusion matrix, prediction grids, comparisons.

Each function returns a matplotlib Figure; the caller logs and closes it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figures(result) -> dict[str, plt.Figure]:
    """Every figure of a finished training run (a `train.Result`), by artifact path."""
    split, title = result.split, result.config.name
    if len(split.val_labels) == 0:  # a refit on every labelled image: only its curves
        return {"plots/training_curves.png": training_curves(result.history, title)}
    predicted = result.val_probabilities.argmax(1)
    show = slice(0, 32)
    wrong = np.flatnonzero(predicted != split.val_labels)[:32]
    return {
        "plots/training_curves.png": training_curves(result.history, title),
        "plots/confusion_matrix.png": confusion_matrix(
            confusion_counts(split.val_labels, predicted), f"{title}: validation confusion matrix"),
        "plots/sample_predictions.png": image_grid(
            split.val_images[show], split.val_labels[show], predicted[show],
            f"{title}: sample validation predictions"),
        "plots/misclassified.png": image_grid(
            split.val_images[wrong], split.val_labels[wrong], predicted[wrong],
            f"{title}: misclassified validation images"),
    }


def training_curves(history: dict[str, list[float]], title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=False):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(epochs, values, style, label=("validation " if prefix else "training ") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    if history.get("learning_rate"):
        axes[2].plot(epochs, history["learning_rate"], "-o")
        axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_counts(true: np.ndarray, pred: np.ndarray, n_classes: int = 10) -> np.ndarray:
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (true, pred), 1)
    return counts


def confusion_matrix(counts: np.ndarray, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, true: np.ndarray, pred: np.ndarray, title: str,
               columns: int = 8) -> plt.Figure:
    """Digits with their true and predicted labels; wrong predictions in red."""
    n = max(1, len(images))
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6 + 0.6))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k].squeeze(), cmap="gray_r")
            ok = true[k] == pred[k]
            ax.set_title(f"true {true[k]} / pred {pred[k]}", fontsize=7, color="black" if ok else "red")
    fig.suptitle(title if len(images) else f"{title}: none")
    fig.tight_layout()
    return fig


def comparison(rows: list[dict]) -> plt.Figure:
    """Side-by-side bars of the compared experiments' metrics, size and time."""
    panels = [
        ("best_val_accuracy", "best validation accuracy"),
        ("final_val_loss", "final validation loss"),
        ("holdout_accuracy", "holdout accuracy"),
        ("parameters", "parameters"),
        ("train_seconds", "training time (s)"),
    ]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    names = [r["experiment"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.5))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels, strict=False):
        values = [r.get(key) if r.get(key) is not None else 0 for r in rows]
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60)
        if key.endswith("accuracy") and values:
            low = min(v for v in values)
            ax.set_ylim(max(0.0, low - 0.05), 1.0)
    fig.tight_layout()
    return fig


def _short(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value >= 1000):
        return f"{value:,.0f}"
    return f"{value:.4f}" if value < 1 else f"{value:.1f}"
