"""`promote --ensemble auto`: an ensemble chosen from the held-out predictions that every
trial stored (`tracking.PREDICTIONS_ARTIFACT`), not the top K by rank.

Greedy forward selection with replacement (Caruana, Niculescu-Mizil, Crew and Ksikes,
"Ensemble selection from libraries of models", ICML 2004), as AutoGluon and
auto-sklearn use it: start from the best single model, then repeatedly add the model
(any, again if it helps) whose addition lowers the held-out log loss of the averaged
probabilities most; stop when no addition lowers it, or at the size limit. A model
picked n times of N gets weight n/N. Written here because none of our dependencies
selects over stored probabilities (scikit-learn's ensembles train their own members),
and it is a few lines of numpy.

The predictions are on images no trial trained on (the study's one validation split,
or out of fold), so the choice is scored as fairly as each trial was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from mlflow.entities import Run

from digitlab.errors import UserError

log = logging.getLogger("digitlab.registry")

EPSILON = 1e-7  # probabilities are clipped here before the log: a stored 0 is float16's


@dataclass(frozen=True)
class Choice:
    members: list[Run]  # distinct runs, heaviest first
    weights: list[float]  # summing to 1
    log_loss: float  # of the weighted average, on the held-out images
    best_single_log_loss: float
    images: int  # held-out images it was chosen on
    skipped: int  # completed trials without stored predictions

    def describe(self) -> str:
        """How the members were chosen: the registered version's description says it."""
        picks = ", ".join(f"trial {m.data.tags.get('trial_number', '?')} x{w:.2f}"
                          for m, w in zip(self.members, self.weights, strict=True))
        return (f"members chosen by greedy selection (Caruana et al. 2004) on {self.images} "
                f"held-out images: {picks}; held-out log loss {self.log_loss:.4f} (best single "
                f"model {self.best_single_log_loss:.4f})")


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, EPSILON, 1.0))))


def greedy(probabilities: list[np.ndarray], labels: np.ndarray, max_size: int) -> list[int]:
    """How many times each model is picked (Caruana et al., with replacement).

    `probabilities[m]` is model m's (n, 10) on the same n held-out images, `labels` their
    digits. The first pick is the best single model; ties go to the lower index (the
    better-ranked trial)."""
    counts = [0] * len(probabilities)
    total = np.zeros_like(probabilities[0], dtype=np.float64)
    size, current = 0, np.inf
    while size < max_size:
        scores = [log_loss((total + p) / (size + 1), labels) for p in probabilities]
        best = int(np.argmin(scores))
        if scores[best] >= current - 1e-12:
            break
        counts[best] += 1
        total += probabilities[best]
        size += 1
        current = scores[best]
    return counts


def stored_predictions(run: Run) -> dict | None:
    """A run's stored held-out predictions, None for a run logged without them."""
    import mlflow

    from digitlab.tracking import PREDICTIONS_ARTIFACT

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path=PREDICTIONS_ARTIFACT)
    except (mlflow.exceptions.MlflowException, OSError):
        return None
    with np.load(path) as stored:
        return {k: stored[k] for k in ("rows", "labels", "probabilities")}


def choose(trials: list[Run], max_size: int) -> Choice:
    """The ensemble of `trials` (ranked best first) that greedy selection picks."""
    stored, kept = [], []
    for trial in trials:
        if (predictions := stored_predictions(trial)) is not None:
            stored.append(predictions)
            kept.append(trial)
    skipped = len(trials) - len(kept)
    if skipped:
        log.warning("--ensemble auto: %d of %d completed trials stored no held-out predictions "
                    "(logged by an older digitlab) and are left out", skipped, len(trials))
    if not kept:
        raise UserError(f"--ensemble auto: none of the {len(trials)} completed trials stored "
                        "held-out predictions (logged by an older digitlab); use --ensemble K")
    # Every trial of a study holds out the same images; line them up by row all the same.
    common = stored[0]["rows"]
    for s in stored[1:]:
        common = np.intersect1d(common, s["rows"])
    if not len(common):
        raise UserError("--ensemble auto: the trials share no held-out image")
    aligned = []
    for s in stored:
        order = np.argsort(s["rows"])
        at = order[np.searchsorted(s["rows"], common, sorter=order)]
        aligned.append(s["probabilities"][at].astype(np.float64))
        labels = s["labels"][at].astype(np.int64)
    counts = greedy(aligned, labels, max_size)
    size = sum(counts)
    picked = sorted((i for i, c in enumerate(counts) if c), key=lambda i: (-counts[i], i))
    weights = [counts[i] / size for i in picked]
    mixed = sum(w * aligned[i] for w, i in zip(weights, picked, strict=True))
    return Choice(members=[kept[i] for i in picked], weights=weights,
                  log_loss=log_loss(mixed, labels),
                  best_single_log_loss=min(log_loss(p, labels) for p in aligned),
                  images=len(common), skipped=skipped)
