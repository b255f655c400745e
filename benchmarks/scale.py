"""The default search at the competition's size: what it costs, and what it trains.

    python benchmarks/scale.py [--quick] [--sizes 5000,21000,42000] [--memory 60000] [--json PATH]

For each size, the default search (`digitlab search --data-dir DIR`, no other flag, as a
user runs it on their own folder), then `digitlab promote` and `digitlab submit`, each as
the real command in a scratch folder with its own MLflow store. 5,000 is the embedded
demo (4,000 labelled images with 1,000 held out); larger sizes are train.csv files of that
many rows and a test.csv of two thirds as many (42,000 and 28,000, as on Kaggle), built
from the embedded digits by shifting copies one or two pixels.

Rows: wall time of the search, trials started and completed, trials trained at full
fidelity (every epoch, all training images), images seen by all trials, the search
process's peak RSS, CSV load time (parse and validate, no cache), and the rows of the
submission. On 5,000 images also the holdout accuracy of the promoted single model, the
top-3 ensemble and `--ensemble auto` (with the trials and weights it chose). --memory
sizes (default 60,000) get one short training run each, for its peak RSS. Shifted copies of the same digits land on both sides of any split, so
accuracy on the larger sets measures nothing and is not reported: they measure time and
memory only.

--quick (CI's smoke test): 5,000 and 10,000 rows with the quick study, two one-epoch trials,
and the training run at 10,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import Row, machine, print_table, scratch  # noqa: E402

BIN = Path(sys.executable).parent
EMBEDDED_ROWS = 5000
SHIFTS = [(dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2) if (dy, dx) != (0, 0)]
ACCURACY_NOTE = ("shifted copies of the same digits sit on both sides of every split: accuracy "
                 "at this size would measure nothing, so only time and memory are reported")


def shifted(images: np.ndarray, count: int, offset: int = 0) -> np.ndarray:
    """`count` images: the originals in turn, each copy after the first shifted by 1-2 px."""
    n = len(images)
    out = np.empty((count, 28, 28), dtype=np.uint8)
    for start in range(0, count, n):
        copy = (start // n + offset) % (len(SHIFTS) + 1)
        block = images[: min(n, count - start)]
        if copy:
            block = np.roll(block, SHIFTS[copy - 1], axis=(1, 2))
        out[start : start + len(block)] = block
    return out


def make_data(folder: Path, rows: int) -> Path:
    """A Kaggle-layout folder: the embedded demo itself at 5,000, else shifted copies."""
    from digitlab import data

    embedded = data.write_embedded(folder / "embedded")
    if rows == EMBEDDED_ROWS:
        return embedded
    source = data.load_kaggle_dir(embedded)
    images = np.concatenate([source.train_images, source.test_images])
    pixels = np.rint(images[..., 0] * 255).astype(np.uint8)
    labels = np.concatenate([source.train_labels, source.test_labels])
    out = folder / f"rows-{rows}"
    out.mkdir()
    idx = np.arange(rows) % len(labels)
    train = shifted(pixels, rows).reshape(rows, -1)
    data.write_int_csv(out / "train.csv", data.TRAIN_HEADER, np.column_stack([labels[idx], train]))
    tests = rows * 2 // 3
    data.write_int_csv(out / "test.csv", data.PIXEL_COLUMNS, shifted(pixels, tests, offset=7).reshape(tests, -1))
    return out


def sh(*args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    # --min-delta 1 registers and scores a version without promoting it: promote says so
    # with exit status 3
    if done.returncode and not (done.returncode == 3 and "--min-delta" in args):
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def load_seconds(folder: Path) -> float:
    """Parse and validate train.csv and test.csv as `digitlab` does, without the cache."""
    import shutil

    from digitlab import data

    shutil.rmtree(folder / data.CACHE_DIR_NAME, ignore_errors=True)
    started = time.perf_counter()
    data.load_kaggle_dir(folder)
    return time.perf_counter() - started


def measure_size(rows: int, quick: bool) -> list[Row]:
    from mlflow import MlflowClient

    from digitlab import registry

    group = f"{rows:,} rows"
    with scratch(f"scale-{rows}") as root:
        folder = make_data(Path(root), rows)
        csv_seconds = load_seconds(folder)
        search = ["--space", "quick", "--trials", "2", "--max-epochs", "1"] if quick else []
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        sh(str(BIN / "digitlab"), "search", "--data-dir", str(folder), *search)
        minutes = (time.perf_counter() - started) / 60
        # The largest child so far: the search (the scratch's data was made in this process).
        peak_gb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20

        client = MlflowClient()
        search_run = registry.latest_search_run(client, [client.get_experiment_by_name(
            "digit-recognizer").experiment_id])
        trials = client.search_runs([search_run.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{search_run.info.run_id}'")
        trials = [t for t in trials if "trial_number" in t.data.tags and not t.data.tags.get("refit_of")]
        complete = [t for t in trials if t.data.tags.get("trial_state") == "COMPLETE"]
        max_epochs = int(search_run.data.params["budget.max_epochs"])
        everything = max((t.data.metrics.get("subset_size", 0) for t in trials), default=0)
        full = [t for t in complete if t.data.metrics.get("epochs_trained") == max_epochs
                and t.data.metrics.get("subset_size") == everything]
        images = sum(t.data.metrics.get("images_seen", 0) for t in trials)

        sh(str(BIN / "digitlab"), "promote", "--force", "--ensemble", "1", "--data-dir", str(folder))
        single = client.get_model_version("digit-recognizer", "1")
        top3 = None
        if rows == EMBEDDED_ROWS and len(complete) >= 3:
            sh(str(BIN / "digitlab"), "promote", "--ensemble", "3", "--min-delta", "1",
               "--data-dir", str(folder))
            top3 = max(client.search_model_versions("name = 'digit-recognizer'"), key=lambda v: int(v.version))
        auto = None
        if rows == EMBEDDED_ROWS:
            sh(str(BIN / "digitlab"), "promote", "--ensemble", "auto", "--min-delta", "1",
               "--data-dir", str(folder))
            auto = max(client.search_model_versions("name = 'digit-recognizer'"), key=lambda v: int(v.version))
        sh(str(BIN / "digitlab"), "submit", "--data-dir", str(folder))
        submitted = len((Path(root) / "submissions" / "submission.csv").read_text().splitlines()) - 1

    study = "quick study, 2 one-epoch trials" if quick else "default study"
    out = [
        Row(group, "search wall time", minutes, "min", "" if quick else "<= 25", None if quick else minutes <= 25,
            note=study),
        Row(group, "trials started / completed", len(trials), "trials",
            note=f"{len(complete)} completed"),
        Row(group, "trials at full fidelity", len(full), "trials", "" if quick else ">= 3",
            None if quick else len(full) >= 3, note=f"{max_epochs} epochs on every training image"),
        Row(group, "images seen, all trials", images, "images"),
        Row(group, "peak RSS of the search", peak_gb, "GB", "<= 4", peak_gb <= 4),
        Row(group, "CSV load: parse + validate", csv_seconds, "s"),
        Row(group, "submission rows", submitted, "rows"),
    ]
    if rows == EMBEDDED_ROWS:
        out.append(Row(group, "holdout accuracy, promoted single", float(single.tags["holdout_accuracy"]) * 100,
                       "%", "" if quick else ">= 98.8", None if quick else float(single.tags["holdout_accuracy"]) >= 0.988,
                       note="1,000 held-out images: one model's standard error is about 0.3 points"))
        if top3 is not None:
            out.append(Row(group, "holdout accuracy, top-3 average", float(top3.tags["holdout_accuracy"]) * 100,
                           "%", ">= 98.9", float(top3.tags["holdout_accuracy"]) >= 0.989))
        if auto is not None and auto.tags.get("ensemble") == "auto":
            out.append(Row(group, "holdout accuracy, --ensemble auto", float(auto.tags["holdout_accuracy"]) * 100,
                           "%", note=f"trial:weight {auto.tags['ensemble_weights']}"))
    else:
        out[-1].note = ACCURACY_NOTE
    return out


def training_peak(rows: int) -> Row:
    """Peak RSS of one `digitlab train` of the default study's model at `rows` labelled rows
    (one epoch of the default study's length): memory at a size the search is not run at."""
    with scratch(f"memory-{rows}") as root:
        folder = make_data(Path(root), rows)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        sh(str(BIN / "digitlab"), "train", "--experiment", "kaggle_cnn_elastic", "--epochs", "1",
           "--set", "training.epoch_images=3840", "--data-dir", str(folder))
        peak_gb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    return Row(f"{rows:,} rows", "peak RSS of one training run", peak_gb, "GB", "<= 4", peak_gb <= 4,
               note="digitlab train, kaggle_cnn_elastic, one epoch of 3,840 images, then its "
                    f"{rows * 2 // 3:,}-row test set predicted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: small sizes, the quick study")
    parser.add_argument("--sizes", default="", help="comma-separated row counts (default 5000,21000,42000)")
    parser.add_argument("--memory", default="",
                        help="comma-separated row counts for a training run's peak RSS (default 60000)")
    parser.add_argument("--json", default="benchmarks/scale.json", help="where to write the JSON")
    args = parser.parse_args()
    from digitlab import console

    console.setup()  # our table, not TensorFlow's start-up lines
    console.import_backend()
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([5000, 10000] if args.quick else [5000, 21000, 42000])
    memory = [int(s) for s in args.memory.split(",") if s] or ([10000] if args.quick else [60000])
    rows: list[Row] = []
    for size in sizes:
        rows += measure_size(size, args.quick)
        print_table(rows)  # as it goes: a full run takes about an hour
    rows += [training_peak(size) for size in memory]
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, {info['date']}"
          + (" (--quick)" if args.quick else ""))
    print_table(rows)
    print(f"\nnote: {ACCURACY_NOTE} (sizes above {EMBEDDED_ROWS:,})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick,
                                           "rows": [r.__dict__ for r in rows]}, indent=1))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
