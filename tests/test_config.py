import pytest

from digitlab import config
from digitlab.errors import ConfigError
from tests.conftest import EXPERIMENTS


def test_every_experiment_file_loads(workdir):
    names = config.available_experiments()
    assert names == EXPERIMENTS and "kaggle_cnn" in names
    for name in names:
        cfg = config.load_experiment(name)
        assert cfg.name == name
        assert cfg.training.batch_size == 64


def test_overrides_replace_nested_and_indexed_values(workdir):
    cfg = config.load_experiment(
        "kaggle_cnn",
        dict(
            config.parse_override(s)
            for s in ["model.dropout=0.3", "model.blocks.1.filters=[48, 96]",
                      "optimizer.learning_rate=3e-4", "augmentation.enabled=false",
                      "training.epochs=2"]
        ),
    )
    assert cfg.model.dropout == 0.3
    assert cfg.model.blocks[1].filters == [48, 96]
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert cfg.augmentation.enabled is False
    assert cfg.training.epochs == 2


def test_int_accepted_for_float(workdir):
    cfg = config.load_experiment("dnn", {"optimizer.learning_rate": 1})
    assert isinstance(cfg.optimizer.learning_rate, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.dropot": 0.2}, "unknown key 'model.dropot'"),
        ({"nosuch.key": 1}, "unknown key 'nosuch'"),
        ({"model.dropout": "high"}, r"model.dropout: expected float, got 'high'"),
        ({"training.epochs": 2.5}, "training.epochs: expected int, got 2.5"),
        ({"augmentation.enabled": 1}, "augmentation.enabled: expected bool"),
        ({"model.blocks.7.filters": [3]}, "no item 'model.blocks.7'"),
        ({"model.dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"optimizer.name": "adagrad"}, "optimizer.name must be"),
        ({"augmentation.elastic": -1.0}, "augmentation strengths must be >= 0"),
        ({"augmentation.elastic_sigma": 0.0}, "elastic_sigma must be > 0"),
        ({"training.average_last_epochs": -1}, "average_last_epochs must be >= 0"),
        ({"training.average_last_epochs": 5, "training.restore_best": True}, "exclude each other"),
    ],
)
def test_bad_overrides_are_errors(workdir, override, message):
    with pytest.raises(ConfigError, match=message):
        config.load_experiment("basic_cnn", override)


def test_parse_override_needs_key_and_value():
    assert config.parse_override("model.dense_units=[256, 64]") == ("model.dense_units", [256, 64])
    key, value = config.parse_override("model.l2=1e-4")
    assert config.apply_overrides(config.ExperimentConfig(), {key: value}).model.l2 == 1e-4
    with pytest.raises(ConfigError, match="expected key=value"):
        config.parse_override("model.l2")


def test_unknown_experiment_lists_the_available_ones(workdir):
    with pytest.raises(ConfigError, match="not found .*basic_cnn"):
        config.load_experiment("nope")


def test_unknown_key_in_file_is_an_error(workdir):
    (workdir / "experiments").mkdir()
    (workdir / "experiments" / "bad.yaml").write_text("model:\n  filtres: [3]\n")
    with pytest.raises(ConfigError, match="bad.yaml: model: unknown key 'filtres'"):
        config.load_experiment("bad")


def test_flat_params_round_trip(workdir):
    cfg = config.load_experiment("lenet5")
    flat = cfg.flat()
    assert flat["model.input_padding"] == 2
    assert flat["training.batch_size"] == 64
    assert config.from_dict(cfg.to_dict()) == cfg
