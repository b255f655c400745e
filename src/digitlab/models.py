"""One builder from an experiment config to a `keras.Model`.

Every architecture is the same shape of network: optional padding, conv blocks
(convs, pooling, dropout), dense layers, softmax. The knobs a search turns
(width, dropout, L2, learning rate, augmentation) mean the same on all of them.
Keras 3 APIs only, so the code runs on the TensorFlow and JAX backends alike.
"""

from __future__ import annotations

import keras
from keras import layers

from digitlab.config import AugmentationConfig, ExperimentConfig, OptimizerConfig

INPUT_SHAPE = (28, 28, 1)
N_CLASSES = 10
# Keras' default (0.99) leaves the moving statistics near their initial values after
# the ~60 steps of an epoch on 4,000 images, so short runs would predict at chance.
BN_MOMENTUM = 0.9


def build(config: ExperimentConfig) -> keras.Model:
    """The classifier: takes float32 (28, 28, 1) in [0, 1], returns class probabilities."""
    m = config.model
    regularizer = keras.regularizers.L2(m.l2) if m.l2 > 0 else None
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    if m.input_padding:
        x = layers.ZeroPadding2D(m.input_padding, name="pad")(x)
    for b, block in enumerate(m.blocks, start=1):
        for c, filters in enumerate(block.filters, start=1):
            x = layers.Conv2D(
                max(1, round(filters * m.width)),
                block.kernel_size,
                padding=m.padding,
                use_bias=not m.batch_norm,  # batch norm's offset replaces the bias
                kernel_regularizer=regularizer,
                name=f"conv{b}_{c}",
            )(x)
            if m.batch_norm:
                x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"conv{b}_{c}_bn")(x)
            x = layers.Activation(m.activation, name=f"conv{b}_{c}_{m.activation}")(x)
        if block.pool == "max":
            x = layers.MaxPooling2D(2, name=f"pool{b}")(x)
        elif block.pool == "avg":
            x = layers.AveragePooling2D(2, name=f"pool{b}")(x)
        if m.conv_dropout > 0:
            x = layers.Dropout(m.conv_dropout, name=f"conv{b}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    for d, units in enumerate(m.dense_units, start=1):
        x = layers.Dense(
            units, use_bias=not m.batch_norm, kernel_regularizer=regularizer, name=f"dense{d}"
        )(x)
        if m.batch_norm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"dense{d}_bn")(x)
        x = layers.Activation(m.activation, name=f"dense{d}_{m.activation}")(x)
        if m.dropout > 0:
            x = layers.Dropout(m.dropout, name=f"dense{d}_dropout")(x)
    # float32 output even under mixed precision, so the softmax stays stable
    outputs = layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=config.name)


def augmentation(aug: AugmentationConfig, seed: int) -> keras.Sequential | None:
    """Random rotation, zoom and shift; active only in training, identity at inference."""
    if not aug.enabled:
        return None
    steps = []
    if aug.rotation > 0:
        steps.append(layers.RandomRotation(aug.rotation / 360.0, fill_mode="constant", seed=seed))
    if aug.zoom > 0:
        steps.append(layers.RandomZoom(aug.zoom, fill_mode="constant", seed=seed + 1))
    if aug.shift > 0:
        steps.append(layers.RandomTranslation(aug.shift, aug.shift, fill_mode="constant", seed=seed + 2))
    return keras.Sequential(steps, name="augmentation") if steps else None


def optimizer(opt: OptimizerConfig) -> keras.optimizers.Optimizer:
    if opt.name == "adam":
        return keras.optimizers.Adam(opt.learning_rate)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(opt.learning_rate)
    return keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum)

