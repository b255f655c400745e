"""The recipe study: holdout accuracy of the default study's CNN and of variations of it
(arms), each trained from many seeds; the search's start and ranges come from it.

    python benchmarks/studies/recipes.py [--arms base,dropout0.3_conv0] [--seeds 12] [--workers 12]
                                         [--minutes 10] [--epochs 40] [--set KEY=VALUE ...]
                                         [--against ARM] [--out DIR] [--json FILE] [--quick]

On a 1,000-image holdout one training run cannot tell a better recipe from a lucky seed, so
every arm trains the same seeds, jobs going out seed by seed so that the arms stay level when
time runs out. All train on one validation split (seed 42, 10% of the images unless an arm
says otherwise) and are scored on the embedded data's holdout. Worker processes train in
parallel; each finished run leaves its result and holdout probabilities in --out, and a
second call with the same --out skips them (one --out holds the runs of one --epochs and
--set only). The summary gives, per arm, the holdout mean and spread over seeds, the gain
over --against paired by seed, all of the arm's models averaged, and every three of them
averaged (what a top-3 ensemble gets when a search cannot rank its trials).

Meant for a GPU machine: there `KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false` lets
a dozen processes share one GPU. On 2 CPU cores each 40-epoch run takes minutes (add
--set training.mixed_precision=true on a CPU with bfloat16 in hardware).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py

from common import claim, publish  # noqa: E402

# The default study as it stood before this study, in float32: its fixed values then (a 10%
# validation split) and its start then (the middle of its former ranges); every arm changes
# only what it names.
BASE = {
    "model.batch_norm": False, "training.mixed_precision": False,
    "augmentation.rotation": 0.0, "augmentation.zoom": 0.0, "augmentation.shift": 0.0,
    "augmentation.elastic": 34.0, "model.width": 1.0, "model.dropout": 0.45,
    "model.conv_dropout": 0.25, "model.l2": 1e-5, "optimizer.learning_rate": 1e-3,
    "training.split_seed": 42,
}
ARMS = {
    "base": {},
    "epochs60": {"training.epochs": 60, "training.lr_decay": 0.966},  # same final rate
    "batch_norm": {"model.batch_norm": True},
    "val_fraction0.025": {"training.validation_fraction": 0.025},
    "batch32": {"training.batch_size": 32},
    "width1.5": {"model.width": 1.5},
    "dense512": {"model.dense_units": [512], "model.dropout": 0.5},
    "dropout0.3_conv0.1": {"model.dropout": 0.3, "model.conv_dropout": 0.1},
    "dropout0.3_conv0": {"model.dropout": 0.3, "model.conv_dropout": 0.0},
    "dropout0.2_conv0.1": {"model.dropout": 0.2, "model.conv_dropout": 0.1},
    "dropout0.2_conv0": {"model.dropout": 0.2, "model.conv_dropout": 0.0},
    # the default start trained on more of the 4,000 images: 3,800 and 3,900 instead of 3,600
    "dropout0.3_conv0_val0.05": {"model.dropout": 0.3, "model.conv_dropout": 0.0,
                                 "training.validation_fraction": 0.05},
    "dropout0.3_conv0_val0.025": {"model.dropout": 0.3, "model.conv_dropout": 0.0,
                                  "training.validation_fraction": 0.025},
    # the mean of the last 5 epochs' weights instead of the last epoch's (stochastic weight averaging)
    "dropout0.3_conv0_val0.05_swa5": {"model.dropout": 0.3, "model.conv_dropout": 0.0,
                                      "training.validation_fraction": 0.05,
                                      "training.average_last_epochs": 5},
    "dropout0.3_conv0.1_l2_0": {"model.dropout": 0.3, "model.conv_dropout": 0.1, "model.l2": 0.0},
    "dropout0.3_conv0.1_l2_1e-4": {"model.dropout": 0.3, "model.conv_dropout": 0.1,
                                   "model.l2": 1e-4},
}


def jobs(arms: list[str], seeds: int) -> list[tuple[int, str]]:
    return [(seed, arm) for seed in range(1, seeds + 1) for arm in arms]


def work(args: argparse.Namespace) -> None:
    """One worker: its share of the jobs, in order, none started after the deadline."""
    from digitlab import config, data, train

    dataset = data.load(args.data_dir)
    out = Path(args.out)
    for j, (seed, arm) in enumerate(jobs(args.arms, args.seeds)):
        done, probabilities = out / f"{arm}__{seed}.json", out / f"{arm}__{seed}.npy"
        if j % args.workers != args.worker or done.exists():
            continue
        if time.time() > args.deadline:
            break
        overrides = {**BASE, "training.epochs": args.epochs, **args.set, **ARMS[arm], "seed": seed}
        cfg = config.load_experiment("kaggle_cnn", overrides)
        result = train.run(cfg, dataset, verbose=0)
        np.save(probabilities, result.holdout_probabilities.astype(np.float16))
        record = {"arm": arm, "seed": seed, "holdout": result.holdout_accuracy,
                  "val_crossentropy": result.val_crossentropy, "seconds": result.train_seconds}
        done.write_text(json.dumps(record))  # last: marks the job done
        print(json.dumps(record), flush=True)


def summary(out: Path, arms: list[str], labels: np.ndarray, against: str = "base") -> dict:
    """Per arm: accuracy over seeds, gain over the `against` arm paired by seed, its models
    averaged."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*__*.json"))]
    runs = [r for r in runs if r["arm"] in arms]
    probs = {(r["arm"], r["seed"]): np.load(out / f"{r['arm']}__{r['seed']}.npy").astype(np.float32)
             for r in runs}
    by_arm = {arm: {r["seed"]: 100 * r["holdout"] for r in runs if r["arm"] == arm} for arm in arms}

    def accuracy(keys) -> float:
        return 100 * float(np.mean(sum(probs[k] for k in keys).argmax(1) == labels))

    def three_averaged(arm: str, seeds: list[int]) -> list[float]:
        """Holdout accuracy of every three of the arm's models averaged: what a search's
        top-3 ensemble gets when it cannot rank its trials."""
        return [accuracy([(arm, s) for s in three]) for three in itertools.combinations(seeds, 3)]

    rows = []
    for arm, scores in by_arm.items():
        if not scores:
            continue
        values = list(scores.values())
        base = by_arm.get(against, {}) if arm != against else {}
        gains = [scores[s] - base[s] for s in scores if s in base]
        threes = three_averaged(arm, list(scores))
        rows.append({
            "arm": arm, "runs": len(values), "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "at_least_99": sum(v >= 99.0 for v in values),
            "gain": statistics.mean(gains) if gains else None,
            "gain_se": statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else None,
            "all_averaged": accuracy([(arm, s) for s in scores]),
            "three_averaged_mean": statistics.mean(threes) if threes else None,
            # 99.2% less a rounding margin: accuracies are multiples of 0.1 on 1,000 images
            "three_averaged_at_least_99.2": (sum(t >= 99.2 - 1e-6 for t in threes) / len(threes)
                                             if threes else None),
            "seconds": statistics.mean(r["seconds"] for r in runs if r["arm"] == arm),
        })
    wrong_share = np.mean([probs[k].argmax(1) != labels for k in probs], axis=0) if probs else None
    # whether ranking by validation cross-entropy, as the search does, picks the better models
    # (only among runs validated on the same images)
    same_split = [r for r in runs if "training.validation_fraction" not in ARMS[r["arm"]]]
    ce, acc = [r["val_crossentropy"] for r in same_split], [r["holdout"] for r in same_split]
    return {
        "against": against,
        "arms": rows,
        "runs": len(runs),
        "all_averaged": accuracy(list(probs)) if probs else None,
        "images_wrong_in_half_of_the_models": None if wrong_share is None else int((wrong_share >= 0.5).sum()),
        "corr_val_crossentropy_holdout": (float(np.corrcoef(ce, acc)[0, 1])
                                          if len(ce) > 2 and np.std(ce) and np.std(acc) else None),
    }


def print_summary(s: dict) -> None:
    if not s["runs"]:
        print("no finished runs")
        return
    print(f"\narm | runs | holdout mean | sd | min-max | runs >= 99.0% | gain over {s['against']} "
          "(se) | all averaged | three averaged: mean, share >= 99.2% | s/run")
    for r in s["arms"]:
        gain = "" if r["gain"] is None else f"{r['gain']:+.2f}"
        gain += "" if r["gain_se"] is None else f" ({r['gain_se']:.2f})"
        three = ("" if r["three_averaged_mean"] is None else
                 f"{r['three_averaged_mean']:.2f}%, {100 * r['three_averaged_at_least_99.2']:.0f}%")
        print(f"{r['arm']} | {r['runs']} | {r['mean']:.2f}% | {r['sd']:.2f} | {r['min']:.1f}-"
              f"{r['max']:.1f}% | {r['at_least_99']} | {gain} | {r['all_averaged']:.1f}% | "
              f"{three} | {r['seconds']:.0f}")
    corr = s["corr_val_crossentropy_holdout"]
    print(f"all {s['runs']} runs averaged: {s['all_averaged']:.1f}%; holdout images wrong in at "
          f"least half of them: {s['images_wrong_in_half_of_the_models']}; correlation of "
          f"validation cross-entropy with holdout accuracy: {'-' if corr is None else f'{corr:.2f}'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    parser.add_argument("--seeds", type=int, default=12, help="seeds 1..N for every arm")
    parser.add_argument("--workers", type=int, default=12, help="training processes at once")
    parser.add_argument("--minutes", type=float, default=10.0, help="no run starts after this")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every arm, e.g. training.mixed_precision=true (YAML value)")
    parser.add_argument("--against", default="base", help="the arm that gains are paired with")
    parser.add_argument("--data-dir", default=None, help="default: the embedded data")
    parser.add_argument("--out", default="/tmp/digitlab-recipes", help="runs, kept for a resume")
    parser.add_argument("--json", default="benchmarks/recipes.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 arms, 1 seed, 1 epoch, 2 workers")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.arms, args.seeds, args.epochs, args.workers = "base,dropout0.3_conv0", 1, 1, 2
    args.arms = [a for a in args.arms.split(",") if a]
    raw_set, args.set = args.set, {}
    for item in raw_set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        args.set[key] = yaml.safe_load(value)
    unknown = [a for a in [*args.arms, args.against] if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        work(args)
        return 0

    claim(Path(args.out), {"epochs": args.epochs, "set": args.set})
    deadline = time.time() + 60 * args.minutes
    command = [sys.executable, __file__, "--arms", ",".join(args.arms), "--seeds", str(args.seeds),
               "--workers", str(args.workers), "--epochs", str(args.epochs), "--out", args.out,
               "--deadline", str(deadline), *(["--data-dir", args.data_dir] if args.data_dir else []),
               *[f"--set={item}" for item in raw_set]]
    workers = [subprocess.Popen([*command, "--worker", str(i)]) for i in range(args.workers)]
    failed = sum(w.wait() != 0 for w in workers)

    from digitlab import data

    publish(summary(Path(args.out), args.arms, data.load(args.data_dir).test_labels, args.against),
            print_summary, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
