"""Training throughput: `train.run` with full MLflow tracking versus a plain `model.fit` on
in-memory NumPy arrays (same model, data, batch size and epochs), on this machine's CPU
(group train) or GPU (group gpu)."""

from __future__ import annotations

import time

from common import Row, interleaved, median, scratch


def measure(quick: bool) -> list[Row]:
    """On the CPU, with targets: an efficient pipeline, tracking under 3% of epoch time."""
    epochs, repeats = (1, 1) if quick else (3, 3)
    return rows("training throughput", "", epochs, repeats, with_targets=True)


def measure_gpu(quick: bool, device: str) -> list[Row]:
    """The same comparison on a GPU, without targets. An epoch of the
    embedded data takes well under a second there, so more epochs keep the first epoch's
    compilation from dominating the median."""
    epochs, repeats = (1, 1) if quick else (10, 3)
    return rows("GPU", f"{device}, ", epochs, repeats, with_targets=False)


def rows(group: str, where: str, epochs: int, repeats: int, with_targets: bool) -> list[Row]:
    ours, plain, ratio, overhead = throughput(epochs, repeats)
    ratio_target = (">= 1.0", ratio >= 1.0) if with_targets else ("", None)
    overhead_target = ("< 3%", overhead < 3.0) if with_targets else ("", None)
    return [
        Row(group, "train.run + MLflow tracking", ours, "images/s",
            note=f"{where}kaggle_cnn, {epochs} epoch(s), median of {repeats}"),
        Row(group, "plain model.fit on NumPy arrays", plain, "images/s"),
        Row(group, "ratio ours / plain", ratio, "x", *ratio_target),
        Row(group, "tracking share of epoch time", overhead, "%", *overhead_target),
    ]


def throughput(epochs: int, repeats: int) -> tuple[float, float, float, float]:
    """Images/s of ours and of a plain fit, their ratio, and tracking's share of fit time (%)."""
    import keras

    from digitlab import config, data, models, runtime, store, tracking, train
    from digitlab.validation import Holdout

    with scratch("train"):
        dataset = data.load()
        # Augmentation off: a plain fit on arrays has none, and the comparison must be fair.
        cfg = config.load_experiment("kaggle_cnn", {"training.epochs": epochs,
                                                    "augmentation.enabled": False,
                                                    "training.lr_decay": 1.0,
                                                    "training.reduce_lr.enabled": False})
        split = data.split(dataset, cfg.training.validation_fraction, cfg.seed)
        images = len(split.train_labels) * epochs
        store.configure()
        logging_seconds = []

        def counting(run_id: str):
            log = tracking.epoch_logger(run_id)

            def timed(epoch: int, metrics: dict) -> None:
                start = time.perf_counter()
                log(epoch, metrics)
                logging_seconds.append(time.perf_counter() - start)

            return timed

        fit_seconds = {"ours": [], "plain": []}

        def ours():
            with tracking.open_run("bench-train") as run:
                tracking.log_setup(cfg, dataset, Holdout())
                result = train.run(cfg, dataset, on_epoch=counting(run.run_id), verbose=0)
            fit_seconds["ours"].append(result.train_seconds)

        def plain():
            runtime.seed_everything(cfg.seed)
            keras.backend.clear_session()
            model = models.build(cfg)
            model.compile(optimizer=models.optimizer(cfg.optimizer),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            start = time.perf_counter()
            model.fit(split.train_images, split.train_labels, batch_size=cfg.training.batch_size,
                      epochs=epochs, validation_data=(split.val_images, split.val_labels), verbose=0)
            fit_seconds["plain"].append(time.perf_counter() - start)

        interleaved({"plain": plain, "ours": ours}, repeats)
    ours_ips = images / median(fit_seconds["ours"])
    plain_ips = images / median(fit_seconds["plain"])
    overhead = 100 * sum(logging_seconds) / sum(fit_seconds["ours"])
    return ours_ips, plain_ips, ours_ips / plain_ips, overhead
