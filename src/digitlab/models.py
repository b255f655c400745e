"""One builder from an experiment config to a `keras.Model`.

Every architecture is the same shape of network: optional padding, conv blocks
(convs, pooling, dropout), dense layers, softmax. The knobs a search turns
(width, dropout, L2, learning rate, augmentation) mean the same on all of them.
Keras 3 APIs only, so the code runs on the TensorFlow and JAX backends alike.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

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
    if aug.elastic > 0:
        steps.append(ElasticDistortion(aug.elastic, aug.elastic_sigma, seed=seed + 3))
    return keras.Sequential(steps, name="augmentation") if steps else None


class ElasticDistortion(layers.Layer):
    """Elastic distortion (Simard, Steinkraus and Platt, 2003, who found it the best
    augmentation for handwritten digits): every pixel moves by a random field, smoothed
    by a Gaussian of `sigma` pixels and scaled by `alpha`, so strokes bend as pen strokes do.
    Identity at inference. (Keras' RandomElasticTransform draws one field for both axes,
    which only moves pixels along the diagonal.)"""

    def __init__(self, alpha: float, sigma: float = 4.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.sigma, self.seed = float(alpha), float(sigma), seed
        self.generator = keras.random.SeedGenerator(seed)
        # The Gaussian is separable: one depthwise kernel blurs along rows, one along
        # columns, each of the two displacement fields on its own.
        radius = max(1, round(3 * self.sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.sigma) ** 2)
        taps = (taps / taps.sum()).astype("float32")
        self.along_x = np.tile(taps.reshape(1, -1, 1, 1), (1, 1, 2, 1))
        self.along_y = self.along_x.reshape(-1, 1, 2, 1)

    def call(self, images, training=None):
        if not training or self.alpha <= 0:
            return images
        batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        field = keras.random.uniform((batch, height, width, 2), -1.0, 1.0, seed=self.generator)
        field = ops.depthwise_conv(field, self.along_x, padding="same")
        field = self.alpha * ops.depthwise_conv(field, self.along_y, padding="same")
        rows = ops.arange(height, dtype="float32")[None, :, None] + field[..., 0]
        cols = ops.arange(width, dtype="float32")[None, None, :] + field[..., 1]
        return ops.cast(bilinear_sample(images[..., 0], rows, cols), images.dtype)[..., None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "sigma": self.sigma, "seed": self.seed}


def bilinear_sample(images, rows, cols):
    """images (batch, height, width) read at real-valued (rows, cols) of the same shape,
    zero outside. A flat gather, which every backend runs with an unknown batch size."""
    height, width = images.shape[1], images.shape[2]
    flat = ops.reshape(ops.cast(images, "float32"), (-1,))
    base = (ops.arange(ops.shape(images)[0]) * (height * width))[:, None, None]
    top, left = ops.floor(rows), ops.floor(cols)
    out = 0.0
    for r, wr in ((top, 1.0 - (rows - top)), (top + 1.0, rows - top)):
        for c, wc in ((left, 1.0 - (cols - left)), (left + 1.0, cols - left)):
            inside = (r >= 0) & (r <= height - 1) & (c >= 0) & (c <= width - 1)
            r_i = ops.cast(ops.clip(r, 0, height - 1), "int32")
            c_i = ops.cast(ops.clip(c, 0, width - 1), "int32")
            value = ops.take(flat, base + r_i * width + c_i)
            out = out + ops.where(inside, value * wr * wc, 0.0)
    return out


def optimizer(opt: OptimizerConfig) -> keras.optimizers.Optimizer:
    if opt.name == "adam":
        return keras.optimizers.Adam(opt.learning_rate)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(opt.learning_rate)
    return keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum)

