import keras
import numpy as np
import pytest

from digitlab import config, data, metrics, models, runtime, train
from tests.conftest import EXPERIMENTS

# Pinned so that an accidental architecture change fails loudly.
PARAMETERS = {
    "dnn": 101_770,
    "basic_cnn": 1_199_882,
    "optimized_cnn": 1_200_554,
    "deep_cnn": 1_181_514,
    "lenet5": 61_706,
    "kaggle_cnn": 888_874,
    "kaggle_cnn_elastic": 887_530,
    "wide_cnn": 231_468,
}


def test_every_experiment_has_a_pinned_parameter_count():
    assert sorted(PARAMETERS) == EXPERIMENTS


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_count_and_output_shape(name, workdir):
    model = models.build(config.load_experiment(name))
    assert model.count_params() == PARAMETERS[name]
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    probabilities = model.predict(np.zeros((3, 28, 28, 1), np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_lenet5_pads_to_32x32_inside_the_model(workdir):
    model = models.build(config.load_experiment("lenet5"))
    assert model.get_layer("pad").output.shape[1:3] == (32, 32)
    assert model.get_layer("conv1_1").output.shape[1:] == (28, 28, 6)


def test_width_scales_every_conv_layer(workdir):
    cfg = config.load_experiment("kaggle_cnn", {"model.width": 0.5})
    model = models.build(cfg)
    filters = [layer.filters for layer in model.layers if layer.name.startswith("conv") and hasattr(layer, "filters")]
    assert filters == [16, 16, 32, 32]


def test_l2_adds_regularisation_losses(workdir):
    plain = models.build(config.load_experiment("basic_cnn"))
    regularised = models.build(config.load_experiment("basic_cnn", {"model.l2": 1e-3}))
    assert len(plain.losses) == 0
    assert len(regularised.losses) == 3  # two convs and the hidden dense layer


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_each_experiment_trains_one_epoch(name, workdir, tiny_dir):
    cfg = config.load_experiment(name, {"training.epochs": 1})
    result = train.run(cfg, data.load(tiny_dir), verbose=0)
    assert result.epochs_trained == 1
    assert set(result.history) == set(metrics.EPOCH_METRICS)
    assert 0.0 <= result.best_val_accuracy <= 1.0
    # Measured on the returned model, it agrees with what Keras logged for the last epoch.
    assert result.val_crossentropy == pytest.approx(result.history["val_crossentropy"][-1], rel=1e-3)
    assert result.val_probabilities.shape == (len(result.split.val_labels), 10)
    assert result.holdout_accuracy is not None


def test_training_batches_give_every_image_once_per_epoch_in_a_new_order(tiny_dir):
    split = data.split(data.load(tiny_dir), 0.1, seed=3)
    n, batch = len(split.train_labels), 64
    # Each image's index, written into its first pixel, tells the passes apart.
    split.train_images[:, 0, 0, 0] = np.arange(n)

    def passes(seed: int) -> list[np.ndarray]:
        args = train.training_batches(split, batch, seed)
        if runtime.backend() != "tensorflow":
            pytest.skip("arrays go to fit as they are on other backends")
        steps = args["steps_per_epoch"]
        assert steps == -(-n // batch)
        stream = iter(args["x"])
        out = []
        for _ in range(2):
            labels, index = [], []
            for _ in range(steps):
                images, y = next(stream)
                index.append(images.numpy()[:, 0, 0, 0].astype(int))
                labels.append(y.numpy())
            index = np.concatenate(index)
            np.testing.assert_array_equal(np.concatenate(labels), split.train_labels[index])
            assert sorted(index) == list(range(n))  # one pass: each image once
            out.append(index)
        assert not np.array_equal(out[0], out[1])  # reshuffled every pass
        return out

    first = passes(5)
    assert all(np.array_equal(a, b) for a, b in zip(first, passes(5), strict=True))  # same seed, same order


def test_split_seed_picks_the_validation_images_and_seed_the_rest(workdir, tiny_dir):
    dataset = data.load(tiny_dir)
    runs = {}
    for seed, split_seed in ((5, 3), (6, 3), (3, None)):
        cfg = config.load_experiment("dnn", {"training.epochs": 1, "seed": seed,
                                             "training.split_seed": split_seed})
        runs[seed] = train.run(cfg, dataset, verbose=0)
        expected = data.split(dataset, cfg.training.validation_fraction, 3)
        np.testing.assert_array_equal(runs[seed].split.val_images, expected.val_images)
    # the same images, but other initial weights: other predictions
    assert not np.allclose(runs[5].val_probabilities, runs[6].val_probabilities)


def test_annealer_keeps_the_cuts_of_lr_reduction_on_plateau(workdir, tiny_dir):
    # A learning rate too small to move the weights keeps val_accuracy flat, so the
    # plateau rule halves the rate after the second epoch; the annealer then halves
    # that reduced rate again instead of resetting it to learning_rate * 0.5**2.
    cfg = config.load_experiment("dnn", {
        "training.epochs": 3, "optimizer.learning_rate": 1e-9, "training.lr_decay": 0.5,
        "training.reduce_lr": {"enabled": True, "monitor": "val_accuracy", "factor": 0.5,
                               "patience": 1, "min_lr": 1e-15},
    })
    result = train.run(cfg, data.load(tiny_dir), verbose=0)
    np.testing.assert_allclose(result.history["learning_rate"], [1e-9, 0.5e-9, 0.125e-9], rtol=1e-5)


def test_weight_averaging_ends_on_the_mean_of_the_last_epochs_weights(workdir, tiny_dir):
    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append(self.model.get_weights())

    digits = data.load(tiny_dir)
    overrides = {"training.epochs": 4, "training.average_last_epochs": 3}
    seen = Snapshots()
    result = train.run(config.load_experiment("basic_cnn", overrides), digits, [seen], verbose=0)
    expected = [np.mean(epochs, axis=0) for epochs in zip(*seen.weights[-3:], strict=True)]
    for got, want, last in zip(result.model.get_weights(), expected, seen.weights[-1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(got, last)  # not simply the last epoch's
    # the run's validation figures are the averaged model's
    np.testing.assert_allclose(result.val_probabilities,
                               train.predict(result.model, result.split.val_images), rtol=1e-5)


def test_mixed_precision_trains_in_the_policy_it_reports(workdir, tiny_dir, monkeypatch):
    # Every CPU can run bfloat16 (only slower without AMX), so this holds on any machine.
    monkeypatch.setattr(runtime, "mixed_policy", lambda: "mixed_bfloat16")
    digits = data.load(tiny_dir)
    mixed = train.run(config.load_experiment(
        "basic_cnn", {"training.epochs": 1, "training.mixed_precision": True}), digits, verbose=0)
    assert mixed.precision == "mixed_bfloat16"
    assert mixed.model.get_layer("conv1_1").compute_dtype == "bfloat16"
    assert mixed.model.get_layer("conv1_1").kernel.dtype == "float32"  # the weights stay float32
    assert mixed.model.output.dtype == "float32"
    plain = train.run(config.load_experiment("basic_cnn", {"training.epochs": 1}), digits, verbose=0)
    assert plain.precision == "float32"
    assert plain.model.get_layer("conv1_1").compute_dtype == "float32"


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
    ("fpu sse2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4
    ("fpu sse2 avx2 avx512f avx512_vnni", False),  # bfloat16 only in software
])
def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    assert runtime.cpu_has_bf16(str(cpuinfo)) is expected


def test_elastic_distortion_bends_training_images_only(tiny_dir):
    images = data.load(tiny_dir).train_images[:16]
    layer = models.ElasticDistortion(alpha=34.0, sigma=4.0, seed=3)
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    moved = np.asarray(layer(images, training=True))
    assert moved.shape == images.shape and moved.dtype == np.float32
    assert 0.0 <= moved.min() and moved.max() <= 1.0
    changed = np.abs(moved - images).reshape(16, -1).max(axis=1)
    assert (changed > 0.1).all()  # every image is bent


def test_elastic_distortion_grows_with_alpha(tiny_dir):
    images = data.load(tiny_dir).train_images[:16]
    change = [float(np.abs(np.asarray(models.ElasticDistortion(alpha, 4.0, seed=3)(images, training=True))
                           - images).mean()) for alpha in (8.0, 34.0, 100.0)]
    assert change[0] < change[1] < change[2]


def test_elastic_distortion_keeps_rows_and_columns_in_place(tiny_dir):
    # A vanishing field must give back the image itself, not a transposed or shifted one.
    images = data.load(tiny_dir).train_images[:4]
    moved = np.asarray(models.ElasticDistortion(alpha=1e-4, sigma=4.0, seed=0)(images, training=True))
    np.testing.assert_allclose(moved, images, atol=1e-3)


def test_elastic_distortion_is_part_of_augmentation(workdir):
    cfg = config.load_experiment("kaggle_cnn", {"augmentation.elastic": 30.0})
    steps = models.augmentation(cfg.augmentation, seed=1).layers
    assert isinstance(steps[-1], models.ElasticDistortion) and steps[-1].alpha == 30.0
    plain = config.load_experiment("kaggle_cnn")
    assert not any(isinstance(s, models.ElasticDistortion)
                   for s in models.augmentation(plain.augmentation, seed=1).layers)


def test_training_runs_with_elastic_distortion(workdir, tiny_dir):
    # fit traces the layer into a graph with an unknown batch size, unlike an eager call
    cfg = config.load_experiment("basic_cnn", {
        "training.epochs": 1, "augmentation.enabled": True, "augmentation.elastic": 34.0,
        "model.blocks.0.filters": [8, 16], "model.dense_units": [32]})
    result = train.run(cfg, data.load(tiny_dir), verbose=0)
    assert result.epochs_trained == 1 and np.isfinite(result.history["loss"][0])
