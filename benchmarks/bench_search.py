"""Figures 3, 4 and 7: search efficiency with and without pruning, engines side by side,
and trials per hour with 1 and 2 workers. Every study runs on the embedded data."""

from __future__ import annotations

import time
from pathlib import Path

from common import Row, scratch

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
          engine="optuna", workers=1) -> dict:
    from mlflow import MlflowClient

    from digitlab import search

    experiment = "basic_cnn" if quick else "optimized_cnn"
    path = Path(f"{name}.yaml")
    path.write_text(SPACE.format(experiment=experiment, trials=trials, epochs=epochs, sampler=sampler,
                                 pruner=pruner, fixed=QUICK_FIXED if quick else ""))
    settings = search.make_settings(str(path), engine=engine, workers=workers, study=name, seed=3)
    start = time.perf_counter()
    summary = search.run(settings)
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


def measure(quick: bool) -> list[Row]:
    trials, epochs = (4, 2) if quick else (10, 8)
    out: list[Row] = []
    with scratch("search"):
        pruned = study("pruned", quick, trials=trials, epochs=epochs)
        full = study("unpruned", quick, trials=trials, epochs=epochs, pruner="none")
        kt = study("hyperband-kt", quick, trials=trials, epochs=epochs, engine="kerastuner")
        random_trials = max(1, pruned["epochs"] // epochs)  # the same epoch budget as TPE+pruning
        rnd = study("random", quick, trials=random_trials, epochs=epochs, sampler="random", pruner="none")
        one = study("workers1", quick, trials=trials, epochs=max(1, epochs // 2), pruner="none")
        two = study("workers2", quick, trials=trials, epochs=max(1, epochs // 2), pruner="none", workers=2)

    fig3 = "3 pruning"
    saved = 100 * (1 - pruned["epochs"] / full["epochs"])
    gap = 100 * (full["best"] - pruned["best"])
    note = f"{trials} trials x up to {epochs} epochs, seed 3"
    out += [
        Row(fig3, "epochs trained, pruning on", pruned["epochs"], "epochs", note=note),
        Row(fig3, "epochs trained, pruning off", full["epochs"], "epochs"),
        Row(fig3, "epochs saved by pruning", saved, "%", ">= 40%", saved >= 40),
        Row(fig3, "wall time, pruning on", pruned["seconds"], "s"),
        Row(fig3, "wall time, pruning off", full["seconds"], "s"),
        Row(fig3, "best val_accuracy, pruning on", pruned["best"], ""),
        Row(fig3, "best val_accuracy, pruning off", full["best"], ""),
        Row(fig3, "accuracy given up by pruning", gap, "points", "<= 0.2", gap <= 0.2),
    ]
    fig4 = "4 engines"
    for label, r in (("Optuna TPE + Hyperband pruning", pruned), ("KerasTuner Hyperband", kt),
                     ("random search (Optuna)", rnd)):
        out.append(Row(fig4, f"{label}: best val_accuracy", r["best"], "",
                       note=f"{r['trials']} trials, {r['epochs']} epochs"))
        out.append(Row(fig4, f"{label}: epochs spent", r["epochs"], "epochs"))
    fig7 = "7 parallel workers"
    tph1 = one["trials"] / one["seconds"] * 3600
    tph2 = two["trials"] / two["seconds"] * 3600
    out += [
        Row(fig7, "trials per hour, 1 worker", tph1, "trials/h"),
        Row(fig7, "trials per hour, 2 workers", tph2, "trials/h"),
        Row(fig7, "speed-up with 2 workers", tph2 / tph1, "x"),
    ]
    return out
