"""Why greedy selection over the trials' held-out predictions keeps the best trial alone,
while an average of the top trials does better on unseen images.

    MLFLOW_TRACKING_URI=sqlite:///STORE/mlflow.db python benchmarks/studies/ensemble_choice.py \\
        --data-dir DIR [--search-run ID] [--json PATH]

For the search's completed trials (ranked as promote ranks them), it reads each trial's
stored held-out predictions (`validation_predictions.npz`: the study's validation split,
the images the trials were ranked on) and predicts DIR's test images with each trial's
model (DIR must hold solution.csv: `benchmarks/kaggle_data.py` builds one from real MNIST).
It prints, for the best trial, the top-k averages and greedy selection
(`search.ensemble`): log loss and accuracy on the held-out split and on the test
images; for a search that trained final models, their test accuracy averaged equally and
with the weights the final stage gives them (the final models have no held-out split). The held-out split chose the best trial; a score measured on the images that
chose it is biased in its favour (the winner's curse), so the comparison of "best alone"
with "best plus others" on those images is tilted toward the best alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--search-run", default="")
    parser.add_argument("--json", default="ensemble_choice.json")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from digitlab import console, data, store
    from digitlab.registry.members import keras_file
    from digitlab.search import ensemble
    from digitlab.search.ranking import latest_search_run, ranked_trials

    console.setup(None)
    dataset = data.load(args.data_dir)
    if dataset.test_labels is None:
        raise SystemExit(f"error: {args.data_dir} has no solution.csv")
    console.import_backend()
    import keras

    store.configure()
    client = MlflowClient()
    search = (client.get_run(args.search_run) if args.search_run
              else latest_search_run(client, [store.experiment_id()]))
    trials = ranked_trials(client, search)
    held, test = [], []
    for trial in trials:
        stored = ensemble.stored_predictions(trial)
        order = np.argsort(stored["rows"])
        held.append((stored["probabilities"][order].astype(np.float64), stored["labels"][order]))
        model = keras.saving.load_model(keras_file(trial.info.run_id), compile=False)
        test.append(np.asarray(model.predict(dataset.test_images, batch_size=1024, verbose=0), np.float64))
    labels = held[0][1]
    truth = dataset.test_labels

    def score(probabilities: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return ensemble.log_loss(probabilities, y), float(np.mean(probabilities.argmax(1) == y)) * 100

    rows = []

    def add(name: str, weights: list[float]) -> None:
        h = sum(w * p for w, (p, _) in zip(weights, held, strict=False) if w)
        t = sum(w * p for w, p in zip(weights, test, strict=False) if w)
        rows.append({"choice": name, "held_out": score(h, labels), "test": score(t, truth)})

    for k in range(1, min(5, len(trials)) + 1):
        add("best trial" if k == 1 else f"top {k} averaged", [1 / k] * k)
    counts = ensemble.greedy([p for p, _ in held], labels, 10)
    total = sum(counts)
    add(f"greedy ({', '.join(f'{c}x trial {i + 1}' for i, c in enumerate(counts) if c)})",
        [c / total for c in counts])
    # The final models, if the search trained them: averaged equally, and weighted as the
    # final stage weighs them (greedy selection over the trials' held-out predictions).
    from digitlab.search import final

    finals = final.run_ids(search)
    if finals:
        probabilities = [np.asarray(keras.saving.load_model(keras_file(i), compile=False)
                                    .predict(dataset.test_images, batch_size=1024, verbose=0), np.float64)
                         for i in finals]
        members = final.choose(trials, len(finals))
        for name, weights in (("final models, equal weights", [1 / len(finals)] * len(finals)),
                              ("final models, greedy weights", [m.weight for m in members])):
            mixed = sum(w * p for w, p in zip(weights, probabilities, strict=True))
            rows.append({"choice": f"{name} ({', '.join(f'{w:.2f}' for w in weights)})",
                         "held_out": (float("nan"), float("nan")), "test": score(mixed, truth)})
    print(f"{len(trials)} completed trials; held-out split {len(labels):,} images, test {len(truth):,}")
    print("choice | held-out log loss | held-out accuracy | test log loss | test accuracy")
    for r in rows:
        print(f"{r['choice']} | {r['held_out'][0]:.4f} | {r['held_out'][1]:.2f}% | "
              f"{r['test'][0]:.4f} | {r['test'][1]:.2f}%")
    # the winner's curse: how far the best trial's held-out rank overstates it on the test
    single = [(score(p, labels)[0], score(t, truth)[0]) for (p, _), t in zip(held, test, strict=True)]
    print("trial (rank) | held-out log loss | test log loss")
    for i, (h, t) in enumerate(single, start=1):
        print(f"{i} | {h:.4f} | {t:.4f}")
    Path(args.json).write_text(json.dumps({"rows": rows, "single": single}, indent=1))
    print(f"written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
