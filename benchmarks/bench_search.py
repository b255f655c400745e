"""Search efficiency: studies with and without pruning, engines side by side, and trials
per hour with 1 and 2 workers. Every study runs on the embedded data."""

from __future__ import annotations

import time
from pathlib import Path

from common import Row, median, scratch

# Ranked by validation cross-entropy, as search/default.yaml is; each study is then read
# by the highest validation accuracy among its completed trials.
SPACE = """
experiments: [{experiment}]
objective: {{metric: val_crossentropy, direction: minimize}}
budget: {{trials: {trials}, max_epochs: {epochs}}}
optuna: {{sampler: {sampler}, pruner: {pruner}}}
kerastuner: {{tuner: hyperband}}
{fixed}
space:
  model.dropout: {{type: float, low: 0.1, high: 0.6}}
  optimizer.learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  model.l2: {{type: float, low: 1.0e-6, high: 1.0e-3, log: true}}
"""
# Quick mode: a small CNN, so the smoke test takes a minute or two.
QUICK_FIXED = "fixed:\n  model.blocks.0.filters: [8, 16]\n  model.dense_units: [32]"


def study(name: str, quick: bool, *, trials: int, epochs: int, sampler="tpe", pruner="hyperband",
          engine="optuna", workers=1, seed=3) -> dict:
    from mlflow import MlflowClient

    from digitlab import search

    experiment = "basic_cnn" if quick else "optimized_cnn"
    path = Path(f"{name}.yaml")
    path.write_text(SPACE.format(experiment=experiment, trials=trials, epochs=epochs, sampler=sampler,
                                 pruner=pruner, fixed=QUICK_FIXED if quick else ""))
    settings = search.make_settings(str(path), engine=engine, workers=workers, study=name, seed=seed)
    start = time.perf_counter()
    summary = search.run_study(settings)
    seconds = time.perf_counter() - start
    rows = summary["rows"]
    counted = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    client = MlflowClient()
    accuracies = [client.get_run(r["run_id"]).data.metrics["val_accuracy"]
                  for r in rows if r["state"] == "COMPLETE" and r["run_id"]]
    return {
        "seconds": seconds,
        "epochs": sum(int(r["epochs"] or 0) for r in counted),
        "best": max(accuracies, default=float("nan")),
        "trials": len(counted),
    }


# The pruned / unpruned pair runs with several seeds: on 400 validation images one image is
# 0.25 points, so a single pair cannot tell a pruner that loses the best trial by chance from
# one that does so as a rule. Seed 3 comes first; the engines' comparison reuses its study.
PRUNING_SEEDS = (3, 1, 2)


def measure(quick: bool) -> list[Row]:
    trials, epochs = (4, 2) if quick else (10, 8)
    seeds = PRUNING_SEEDS[:1] if quick else PRUNING_SEEDS
    out: list[Row] = []
    with scratch("search"):
        pairs = [(study(f"pruned-{seed}", quick, trials=trials, epochs=epochs, seed=seed),
                  study(f"unpruned-{seed}", quick, trials=trials, epochs=epochs, pruner="none", seed=seed))
                 for seed in seeds]
        pruned = pairs[0][0]
        kt = study("hyperband-kt", quick, trials=trials, epochs=epochs, engine="kerastuner")
        random_trials = max(1, pruned["epochs"] // epochs)  # the same epoch budget as TPE+pruning
        rnd = study("random", quick, trials=random_trials, epochs=epochs, sampler="random", pruner="none")
        one = study("workers1", quick, trials=trials, epochs=max(1, epochs // 2), pruner="none")
        two = study("workers2", quick, trials=trials, epochs=max(1, epochs // 2), pruner="none", workers=2)

    pruning = "pruning"
    saved, gaps = [], []
    for seed, (on, off) in zip(seeds, pairs, strict=True):
        saved.append(100 * (1 - on["epochs"] / off["epochs"]))
        gaps.append(100 * (off["best"] - on["best"]))
        out += [
            Row(pruning, f"seed {seed}: epochs saved by pruning", saved[-1], "%",
                note=f"{on['epochs']} / {off['epochs']} epochs and {on['seconds']:.0f} / "
                     f"{off['seconds']:.0f} s with / without pruning; {trials} trials x up to {epochs} epochs"),
            Row(pruning, f"seed {seed}: accuracy given up by pruning", gaps[-1], "points",
                note=f"best val_accuracy {on['best']:.4f} / {off['best']:.4f} with / without pruning"),
        ]
    label = "median over seeds " + ", ".join(map(str, seeds))
    out += [
        Row(pruning, f"epochs saved by pruning, {label}", median(saved), "%", ">= 40%", median(saved) >= 40),
        Row(pruning, f"accuracy given up by pruning, {label}", median(gaps), "points", "<= 0.2",
            median(gaps) <= 0.2),
    ]
    engines = "engines"
    for label, r in (("Optuna TPE + Hyperband pruning", pruned), ("KerasTuner Hyperband", kt),
                     ("random search (Optuna)", rnd)):
        out.append(Row(engines, f"{label}: best val_accuracy", r["best"], "",
                       note=f"{r['trials']} trials, {r['epochs']} epochs"))
        out.append(Row(engines, f"{label}: epochs spent", r["epochs"], "epochs"))
    workers = "parallel workers"
    tph1 = one["trials"] / one["seconds"] * 3600
    tph2 = two["trials"] / two["seconds"] * 3600
    out += [
        Row(workers, "trials per hour, 1 worker", tph1, "trials/h"),
        Row(workers, "trials per hour, 2 workers", tph2, "trials/h"),
        Row(workers, "speed-up with 2 workers", tph2 / tph1, "x"),
    ]
    return out
