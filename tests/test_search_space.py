import pytest

from digitlab.errors import ConfigError
from digitlab.search import search_file

BASE = """
experiments: [basic_cnn]
objective: {metric: val_accuracy, direction: maximize}
budget: {trials: 3, max_epochs: 2}
space:
  model.dropout: {type: float, low: 0.1, high: 0.5}
  optimizer.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  model.blocks.0.filters: {type: categorical, choices: [[16, 32], [32, 64]]}
  augmentation.enabled: {type: categorical, choices: [true, false]}
  model.width: {type: float, low: 0.5, high: 1.5, step: 0.25}
"""


def write(workdir, text, name="s.yaml"):
    path = workdir / name
    path.write_text(text)
    return path


def test_shipped_space_files_load(workdir):
    from tests.conftest import REPO

    for path in sorted((REPO / "search").glob("*.yaml")):
        s = search_file.load(path)
        assert s.budget.trials >= 1 and s.params, path


def test_a_space_file_loads_with_all_range_kinds(workdir):
    s = search_file.load(write(workdir, BASE))
    kinds = {p.key: p.kind for p in s.params}
    assert kinds == {"model.dropout": "float", "optimizer.learning_rate": "float",
                     "model.blocks.0.filters": "categorical", "augmentation.enabled": "categorical",
                     "model.width": "float"}
    lr = next(p for p in s.params if p.key == "optimizer.learning_rate")
    assert lr.log and lr.low == pytest.approx(1e-4)
    experiment, overrides = s.overrides({"model.dropout": 0.3})
    assert experiment == "basic_cnn"
    assert overrides["training.epochs"] == 2


def test_several_experiments_make_the_architecture_a_parameter(workdir):
    s = search_file.load(write(workdir, BASE.replace("[basic_cnn]", "[basic_cnn, kaggle_cnn]")))
    assert s.params[0].key == "experiment"
    assert s.params[0].choices == ("basic_cnn", "kaggle_cnn")
    cfg = s.trial_config({"experiment": "kaggle_cnn", "model.dropout": 0.2}, seed=1, number=4)
    assert cfg.name == "kaggle_cnn" and cfg.model.dropout == 0.2
    assert (cfg.seed, cfg.split_seed) == (5, 1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("model.dropout:", "model.dropot:"), "space.model.dropot on basic_cnn: override 'model.dropot': unknown key"),
        (("low: 0.1, high: 0.5", "low: 0.9, high: 0.5"), "space.model.dropout: low 0.9 is greater than high 0.5"),
        (("low: 0.1, high: 0.5", "low: 0.1, high: 1.5"), r"space.model.dropout on basic_cnn: .*dropout must be in"),
        (("low: 1.0e-4, high: 1.0e-2, log: true", "low: 0, high: 1.0e-2, log: true"), "a log range needs low > 0"),
        (("{type: float, low: 0.1, high: 0.5}", "{type: floaty, low: 0.1, high: 0.5}"), "type 'floaty' is not"),
        (("{type: float, low: 0.1, high: 0.5}", "{type: float, low: 0.1}"), "float needs numeric low and high"),
        (("choices: [true, false]", "choices: []"), "categorical needs a non-empty list"),
        (("direction: maximize", "direction: up"), "objective.direction must be"),
        (("metric: val_accuracy", "metric: f1"), "objective.metric must be one of"),
        (("trials: 3", "trials: 0"), "budget.trials must be a positive integer"),
        (("trials: 3", "trials: 3, minutes: 0"), "budget.minutes must be a positive number"),
        (("trials: 3", "trials: 3, minutes: soon"), "budget.minutes: 'soon' is not a float"),
        (("trials: 3", "trials: 2.5"), "budget.trials: expected int, got 2.5"),
        (("trials: 3", "trials: 3, epochs: 4"), r"budget: unknown key 'epochs' \(known: epoch_images, "),
        (("objective:", "objectives:"), r": unknown key 'objectives' \(known: budget, description, "),
        (("[basic_cnn]", "[]"), "experiments must name one experiment or a list of them"),
        (("experiments: [basic_cnn]\n", ""), "missing key 'experiments'"),
        (("[basic_cnn]", "{name: basic_cnn}"), "experiments: expected a list"),
        (("max_epochs: 2", "max_epochs: 2}\noptuna: {min_epochs: 3"),
         "optuna.min_epochs must be an integer from 1 to budget.max_epochs"),
        (("space:", "start: {model.l2: 0.001}\nspace:"), "start.model.l2 is not a parameter of the space"),
        (("space:", "start: {model.dropout: 0.6}\nspace:"), "start.model.dropout = 0.6 is not a value of"),
        (("space:", "start: {model.width: 0.6}\nspace:"), "start.model.width = 0.6 is not a value of"),
        (("space:", "start: {augmentation.enabled: maybe}\nspace:"), "start.augmentation.enabled = 'maybe'"),
        (("space:", "start: [0.3]\nspace:"), "start: expected a mapping, got \\[0.3\\]"),
        (("[basic_cnn]", "[no_such_model]"), "experiment 'no_such_model' not found"),
    ],
)
def test_malformed_spaces_are_clear_errors(workdir, edit, message):
    old, new = edit
    assert old in BASE
    with pytest.raises(ConfigError, match=message):
        search_file.load(write(workdir, BASE.replace(old, new, 1)))


def test_start_values_load_and_leave_the_fingerprint_alone(workdir):
    start = "start: {model.dropout: 0.3, model.width: 1.25, model.blocks.0.filters: [32, 64]}\n"
    s = search_file.load(write(workdir, BASE + start))
    assert s.start == {"model.dropout": 0.3, "model.width": 1.25, "model.blocks.0.filters": [32, 64]}
    assert s.fingerprint() == search_file.load(write(workdir, BASE, "plain.yaml")).fingerprint()


def test_fingerprint_ignores_the_budget_but_not_the_space(workdir):
    a = search_file.load(write(workdir, BASE))
    b = search_file.load(write(workdir, BASE.replace("trials: 3", "trials: 9"), "b.yaml"))
    c = search_file.load(write(workdir, BASE.replace("high: 0.5", "high: 0.6"), "c.yaml"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_objective_is_the_score_of_the_model_the_trial_keeps(workdir):
    """A trial whose best epoch came before its last is ranked by the weights it registers."""
    import numpy as np

    from digitlab import config, train
    from digitlab.data import Split
    from digitlab.search.trial import objective_value

    labels = np.array([0, 1, 2, 3])
    probabilities = np.eye(10, dtype=np.float32)[[0, 1, 2, 9]]  # the kept model gets 3 of 4 right
    empty = np.zeros((0, 28, 28, 1), dtype=np.float32)
    result = train.Result(
        config=config.load_experiment("basic_cnn"), model=None,
        split=Split(empty, labels[:0], empty, labels),
        history={"val_accuracy": [0.5, 1.0, 0.75], "val_loss": [0.9, 0.2, 0.4]},
        val_probabilities=probabilities, holdout_probabilities=None, holdout_accuracy=None,
        train_seconds=1.0, precision="float32",
    )
    s = search_file.load(write(workdir, BASE))
    assert objective_value(s, result) == 0.75
    s = search_file.load(write(workdir, BASE.replace("metric: val_accuracy, direction: maximize",
                                               "metric: val_crossentropy, direction: minimize")))
    # Three sure and right (log 1 = 0), one sure and wrong (clipped at 1e-7), on the kept model.
    assert objective_value(s, result) == pytest.approx(-np.log(1e-7) / 4, rel=1e-5)
    s = search_file.load(write(workdir, BASE.replace("metric: val_accuracy, direction: maximize",
                                               "metric: val_loss, direction: minimize")))
    assert objective_value(s, result) == 0.4
    result.history["val_loss"][-1] = float("nan")
    assert objective_value(s, result) is None


def test_a_minimal_file_takes_the_one_set_of_defaults(workdir):
    """Every section is optional (empty is the same as absent), and its defaults are the
    dataclasses' own: there is no second copy of them in the loader."""
    s = search_file.load(write(workdir, "experiment: basic_cnn\noptuna:\nspace:\n"
                                  "  model.dropout: {type: float, low: 0.1, high: 0.5}\n"))
    assert s.experiments == ["basic_cnn"] and s.name == "s"
    assert (s.objective, s.budget, s.optuna, s.kerastuner, s.validation) == (
        search_file.Objective(), search_file.Budget(), search_file.OptunaOptions(), search_file.KerasTunerOptions(),
        {})
    assert (s.max_consecutive_failures, s.refit, s.fixed, s.start) == (3, False, {}, {})
    overridden = search_file.load(s.path, {"trials": 7, "minutes": 2.5}, validation={"folds": 4})
    assert (overridden.budget.trials, overridden.budget.minutes, overridden.budget.max_epochs) == (7, 2.5, 10)
    assert overridden.validator.n_splits == 4
