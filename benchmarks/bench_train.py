"""Figure 1: training throughput of `train.run` with full MLflow tracking versus a plain
`model.fit` on in-memory NumPy arrays (same model, data, batch size and epochs)."""

from __future__ import annotations

import time

from common import Row, interleaved, median, scratch


def measure(quick: bool) -> list[Row]:
    import keras

    from digitlab import config, data, models, runtime, tracking, train

    epochs, repeats = (1, 1) if quick else (3, 3)
    with scratch("train"):
        dataset = data.load()
        # Augmentation off: a plain fit on arrays has none, and the comparison must be fair.
        cfg = config.load_experiment("kaggle_cnn", {"training.epochs": epochs,
                                                    "augmentation.enabled": False,
                                                    "training.lr_decay": 1.0,
                                                    "training.reduce_lr.enabled": False})
        split = data.split(dataset, cfg.training.validation_fraction, cfg.seed)
        images = len(split.train_labels) * epochs
        tracking.configure()
        logging_seconds = []

        class CountingLogger(tracking.EpochLogger):
            def on_epoch_end(self, epoch, logs=None):
                start = time.perf_counter()
                super().on_epoch_end(epoch, logs)
                logging_seconds.append(time.perf_counter() - start)

        fit_seconds = {"ours": [], "plain": []}

        def ours():
            with tracking.run("bench-train") as run:
                tracking.log_setup(cfg, dataset)
                result = train.run(cfg, dataset, callbacks=[CountingLogger(run.run_id)], verbose=0)
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
    ratio = ours_ips / plain_ips
    overhead = 100 * sum(logging_seconds) / sum(fit_seconds["ours"])
    fig = "1 training throughput"
    return [
        Row(fig, "train.run + MLflow tracking", ours_ips, "images/s", note=f"kaggle_cnn, {epochs} epoch(s), median of {repeats}"),
        Row(fig, "plain model.fit on NumPy arrays", plain_ips, "images/s"),
        Row(fig, "ratio ours / plain", ratio, "x", ">= 1.0", ratio >= 1.0),
        Row(fig, "tracking share of epoch time", overhead, "%", "< 3%", overhead < 3.0),
    ]
