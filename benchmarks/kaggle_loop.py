"""The loop a Kaggle competitor runs, on real MNIST at the competition's size: what it costs
and what the file it hands to Kaggle scores.

    python benchmarks/kaggle_loop.py [--data-dir DIR] [--minutes T] [--baseline] [--json PATH]
    python benchmarks/kaggle_loop.py --quick

In a scratch folder with its own MLflow store, the real commands, as the README gives
them: `digitlab search --data-dir DIR` (no other flag, or `--minutes T`), `digitlab
promote --data-dir DIR`, `digitlab submit --data-dir DIR`, then `digitlab score` of the
submission against DIR/solution.csv. DIR defaults to the folder `kaggle_data.py` builds
from real MNIST (42,000 labelled rows, 18,000 test rows; built into the cache on first
use). With --baseline, also the seed notebook's recipe run the same way: `digitlab train
--experiment kaggle_cnn --data-dir DIR`.

Rows: each command's wall time and the loop's total, the budget's plan line, trials run
and completed, the submission's accuracy on the test rows (what Kaggle would score), the
best trial's and each final model's own accuracy there, and the baseline's. One model's
standard error at 99.6% on 18,000 images is about 0.05 points.

--quick (a smoke test): the embedded demo, the quick study with two one-epoch trials.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Row, machine, print_table, scratch  # noqa: E402
from kaggle_data import DEFAULT_CACHE, build  # noqa: E402

BIN = Path(sys.executable).parent


def sh(*args: str) -> tuple[str, float]:
    """Run a digitlab command; its standard output and wall time in minutes."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr, minutes


def measure(folder: Path, search: list[str], baseline: bool) -> list[Row]:
    from mlflow import MlflowClient

    from digitlab.search import final
    from digitlab.search.ranking import latest_search_run, ranked_trials

    group = "kaggle loop"
    digitlab, data = str(BIN / "digitlab"), ["--data-dir", str(folder)]
    with scratch("kaggle-loop") as root:
        searched, search_minutes = sh(digitlab, "search", *data, *search)
        promoted, promote_minutes = sh(digitlab, "promote", *data)
        _, submit_minutes = sh(digitlab, "submit", *data)
        scored, _ = sh(digitlab, "score", str(Path(root) / "submissions" / "submission.csv"),
                       str(folder / "solution.csv"))
        accuracy = float(scored.split()[-1]) * 100
        client = MlflowClient()
        search_run = latest_search_run(client, [client.get_experiment_by_name("digit-recognizer").experiment_id])
        plan = search_run.data.tags.get("budget_plan", "")
        trials = ranked_trials(client, search_run)
        started = sum(int(v) for k, v in search_run.data.metrics.items() if k.startswith("trials_"))
        finals = [client.get_run(i) for i in final.run_ids(search_run)]
        rows = [
            Row(group, "digitlab search", search_minutes, "min", note=plan),
            Row(group, "digitlab promote", promote_minutes, "min", note=promoted.strip().splitlines()[-1]),
            Row(group, "digitlab submit", submit_minutes, "min"),
            Row(group, "the loop in all", search_minutes + promote_minutes + submit_minutes, "min",
                "<= 60" if not search else ""),
            Row(group, "trials run / completed", started, "trials", note=f"{len(trials)} completed"),
            Row(group, "submission accuracy (score)", accuracy, "%", ">= 99.6" if not search else "",
                (accuracy >= 99.6) if not search else None,
                note=f"{len(finals)} final model(s)" if finals else "the best trial"),
        ]
        if trials:
            rows.append(Row(group, "best trial alone", trials[0].data.metrics["holdout_accuracy"] * 100, "%",
                            note=f"trial {trials[0].data.tags.get('trial_number')}"))
        for run in finals:
            rows.append(Row(group, f"final model {run.data.tags['final_index']} alone",
                            run.data.metrics["holdout_accuracy"] * 100, "%",
                            note=f"trial {run.data.tags['trial_number']}, {run.data.tags['final_passes']} passes, "
                                 f"seed {run.data.params['seed']}"))
        if baseline:
            trained, minutes = sh(digitlab, "train", "--experiment", "kaggle_cnn", *data)
            value = float(trained.split("holdout_accuracy ")[1].split()[0].rstrip(",")) * 100
            rows.append(Row(group, "seed notebook's recipe (train --experiment kaggle_cnn)", value, "%",
                            note=f"{minutes:.1f} min"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a Kaggle-layout folder with solution.csv (default: built by kaggle_data.py)")
    parser.add_argument("--minutes", type=float, default=0, help="the search's --minutes (0: none given)")
    parser.add_argument("--baseline", action="store_true", help="also train the seed notebook's recipe")
    parser.add_argument("--json", default="benchmarks/kaggle_loop.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    search = ["--minutes", f"{args.minutes:g}"] if args.minutes else []
    if args.quick:
        from digitlab import data

        folder = data.write_embedded(Path(os.environ.get("TMPDIR", "/tmp")) / "digitlab-kaggle-loop-quick")
        search = ["--space", "quick", "--trials", "2", "--max-epochs", "1"]
    else:
        folder = args.data_dir or build(DEFAULT_CACHE / "kaggle-42000")
    rows = measure(folder, search, args.baseline)
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, {info['date']}")
    print_table(rows)
    Path(args.json).write_text(json.dumps({"machine": info, "data_dir": str(folder), "search": search,
                                           "rows": [r.__dict__ for r in rows]}, indent=1))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
