"""Inference: rows per second from a 28,000-row test.csv to submission.csv, through the
registered model (load, parse and validate, predict in batches, write and validate)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from common import Row, median, scratch

ROWS = 28_000


def measure(quick: bool) -> list[Row]:
    from mlflow import MlflowClient

    from digitlab import config, data, registry, store, submission, training_run

    repeats = 1 if quick else 3
    experiment = "dnn" if quick else "kaggle_cnn"
    with scratch("inference") as root:
        dataset = data.load()
        store.configure()
        run_id, _, _ = training_run.tracked_run(
            config.load_experiment(experiment, {"training.epochs": 1}), dataset, verbose=0)
        version = registry.register([MlflowClient().get_run(run_id)], None, False, dataset,
                                    registry.policy())
        big = Path(root) / "kaggle-size"
        big.mkdir()
        shutil.copy(data.DEFAULT_DATA_DIR / "train.csv", big / "train.csv")
        pixels = np.rint(dataset.test_images.reshape(len(dataset.test_images), -1) * 255).astype(int)
        data.write_int_csv(big / "test.csv", data.PIXEL_COLUMNS, pixels[np.arange(ROWS) % len(pixels)])
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            # force: the 28,000 rows are copies of the demo's test images, other data than
            # the model's by digest; this measures time, not a submission to hand in
            result = submission.submit(data.load(str(big)), registry.policy(),
                                       model_uri=f"models:/digit-recognizer/{version.version}",
                                       output=str(Path(root) / "submission.csv"), force=True)
            seconds.append(time.perf_counter() - start)
            assert result["rows"] == ROWS
    group = "inference"
    return [
        Row(group, f"test.csv -> submission.csv ({experiment}), first run", ROWS / seconds[0], "rows/s",
            note=f"{ROWS} rows; first run parses the CSV cold, later ones hit the cache"),
        Row(group, f"test.csv -> submission.csv ({experiment}), median", ROWS / median(seconds), "rows/s",
            note=f"median of {repeats}"),
    ]
