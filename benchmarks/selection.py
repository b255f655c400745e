"""Selection on small data: one validation split against K-fold validation (K = 3, 5).

    python benchmarks/selection.py [--quick] [--keep]       (or run.py --only selection)

The same study runs once per way of validating, on the embedded data: the random sampler
with the same seed draws the same hyperparameters in every study, so the trials differ only
in how they are scored. For each way, over the completed trials:

- the Spearman rank correlation between the trials' objective and the holdout accuracy of
  the model each trial hands on (for K-fold: its K fold models averaged, what promote
  registers), taken so that 1 means the objective ranks trials exactly as the holdout does;
- the holdout accuracy of the version `digitlab promote` registers, and what the choice
  gave up against the trial with the best holdout accuracy;
- wall time per trial (a K-fold trial trains K models).

A single split scores each trial on a few hundred images, where one image is a quarter of a
point; out-of-fold predictions score it on every training image. Long: about an hour and a
half on 2 cores; --quick (3 trials of one epoch on 300 images) is a smoke test of a few
minutes, most of it spent building and tracing 27 small models.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script

import common  # noqa: E402
from common import Row, print_table, scratch  # noqa: E402

GROUP = "selection"
MODES = (("one split", 0), ("3-fold", 3), ("5-fold", 5))
# Ranked by validation cross-entropy, as search/default.yaml is; wide ranges of learning
# rate, dropout and L2, so that the trials differ on the holdout by more than its noise.
SPACE = """
experiments: [basic_cnn]
objective: {{metric: val_crossentropy, direction: minimize}}
budget: {{trials: {trials}, max_epochs: {epochs}}}
optuna: {{sampler: random, pruner: none}}
validation: {{folds: {folds}}}
max_consecutive_failures: {trials}
{fixed}
space:
  model.dropout: {{type: float, low: 0.1, high: 0.7}}
  optimizer.learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  model.l2: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
"""
QUICK_FIXED = "fixed:\n  model.blocks.0.filters: [8, 16]\n  model.dense_units: [32]"
QUICK_PER_CLASS = (30, 10)  # training and holdout images of each digit with --quick


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (tied values share their mean rank); None when either side is
    constant or there are fewer than three trials."""
    import pandas as pd

    if len(x) < 3:
        return None
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def quick_data(root: Path) -> Path:
    """A small stratified subset of the embedded data in Kaggle layout."""
    from digitlab import data

    full = data.load()
    out = root / "quick-data"
    out.mkdir()
    rng = np.random.default_rng(0)

    def pick(labels: np.ndarray, n: int) -> np.ndarray:
        return rng.permutation(np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in range(10)]))

    def pixels(images: np.ndarray) -> np.ndarray:
        return np.rint(images.reshape(len(images), -1) * 255).astype(int)

    train, test = pick(full.train_labels, QUICK_PER_CLASS[0]), pick(full.test_labels, QUICK_PER_CLASS[1])
    data.write_int_csv(out / "train.csv", data.TRAIN_HEADER,
                       np.column_stack([full.train_labels[train], pixels(full.train_images[train])]))
    data.write_int_csv(out / "test.csv", data.PIXEL_COLUMNS, pixels(full.test_images[test]))
    data.write_int_csv(out / "solution.csv", data.SOLUTION_HEADER,
                       np.column_stack([np.arange(1, len(test) + 1), full.test_labels[test]]))
    return out


def study(label: str, folds: int, quick: bool, data_dir: str | None, *, trials: int,
          epochs: int) -> dict:
    from mlflow import MlflowClient

    from digitlab import data, registry, search

    name = f"selection-{folds or 1}"
    path = Path(f"{name}.yaml")
    path.write_text(SPACE.format(trials=trials, epochs=epochs, folds=folds,
                                 fixed=QUICK_FIXED if quick else ""))
    settings = search.make_settings(str(path), engine="optuna", study=name, data_dir=data_dir,
                                    seed=5)
    start = time.perf_counter()
    summary = search.run_study(settings)
    seconds = time.perf_counter() - start
    client = MlflowClient()
    ranked = registry.ranked_trials(client, client.get_run(summary["parent_run_id"]))
    # Minimised cross-entropy: its negative, so that a higher score is a better trial.
    scores = [-t.data.metrics["objective"] for t in ranked]
    holdout = [t.data.metrics["holdout_accuracy"] for t in ranked]
    _, _, version = registry.promote(data.load(data_dir), registry.policy(),
                                     search_run_id=summary["parent_run_id"], force=True)
    chosen = float(version.tags["holdout_accuracy"])
    return {"label": label, "rho": spearman(scores, holdout), "chosen": chosen,
            "best": max(holdout), "completed": len(ranked), "trials": len(summary["rows"]),
            "seconds": seconds, "members": version.tags.get("ensemble_members", "1")}


def measure(quick: bool) -> list[Row]:
    trials, epochs = (3, 1) if quick else (16, 8)
    with scratch("selection") as root:
        data_dir = str(quick_data(root)) if quick else None
        results = [study(label, folds, quick, data_dir, trials=trials, epochs=epochs)
                   for label, folds in MODES]
    rows = []
    for r in results:
        rows += [
            Row(GROUP, f"{r['label']}: rank correlation, objective vs holdout", r["rho"], "Spearman",
                note=f"{r['completed']} completed trials of {trials}, "
                     f"{epochs} epoch{'s' if epochs != 1 else ''} each"),
            Row(GROUP, f"{r['label']}: holdout accuracy of the promoted version", 100 * r["chosen"], "%",
                note=f"{r['members']} model(s) averaged"),
            Row(GROUP, f"{r['label']}: holdout accuracy given up by the choice",
                100 * (r["best"] - r["chosen"]), "points"),
            Row(GROUP, f"{r['label']}: wall time per trial", r["seconds"] / max(1, r["trials"]), "s"),
        ]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny trials on a subset: a smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and its MLflow store")
    args = parser.parse_args()
    common.KEEP_SCRATCH = args.keep
    from digitlab import console

    console.setup()
    print_table(measure(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
