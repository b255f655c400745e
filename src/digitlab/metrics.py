"""Metric names shared by training, tracking and the search (no backend import here)."""

# `loss` adds the L2 penalty to the cross-entropy, so it cannot compare runs with different
# L2; `crossentropy` is the data term alone, the finer-grained measure of validation fit.
# `images_seen` counts the training images fed so far (the x axis that means the same at
# any data size).
EPOCH_METRICS = ("loss", "accuracy", "crossentropy", "val_loss", "val_accuracy", "val_crossentropy",
                 "learning_rate", "images_seen")
# What a study may rank its trials by.
OBJECTIVE_METRICS = tuple(m for m in EPOCH_METRICS if m not in ("learning_rate", "images_seen"))
