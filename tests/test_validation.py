"""One holdout split and K folds: two ways of validating that keep one contract."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from digitlab import config, data, validation
from digitlab.errors import ConfigError, UserError


def tiny_config():
    cfg = config.load_experiment("basic_cnn", {"model.blocks.0.filters": [4, 8], "model.dense_units": [16],
                                                "training.epochs": 1, "training.batch_size": 32})
    return dataclasses.replace(cfg, seed=3)


def as_run(tags: dict, run_id: str = "r1"):
    """What `from_run` reads of an MLflow run: its tags (all strings, as MLflow keeps them)."""
    return SimpleNamespace(data=SimpleNamespace(tags={k: str(v) for k, v in tags.items()}),
                           info=SimpleNamespace(run_id=run_id))


@pytest.mark.parametrize("way", [validation.Holdout(), validation.KFold(3),
                                 validation.RepeatedHoldout(2, 0.2)],
                         ids=["holdout", "3 folds", "2 repeated holdouts"])
def test_each_way_keeps_the_contract(way, tiny_dir):
    dataset = data.load(tiny_dir)
    cfg = tiny_config()
    way.check(dataset, cfg)

    # fit trains through train.run and says which labelled rows it held out
    result = way.fit(cfg, dataset, verbose=0)
    rows = result.split.val_rows
    assert len(rows) == len(result.split.val_labels) == len(result.val_probabilities)
    assert np.array_equal(dataset.train_labels[rows], result.split.val_labels)
    assert result.val_probabilities.shape == (len(rows), 10)

    # what a run records is enough to rebuild the same way from its tags
    tags = way.tags(cfg)
    assert int(tags["split_seed"]) == cfg.split_seed
    rebuilt = validation.from_run(as_run(tags))
    assert rebuilt == way.resolved(cfg) and rebuilt.n_splits == way.n_splits
    parts, key = way.datasets(cfg, dataset)
    assert "training" in parts and str(cfg.split_seed) in key

    # scoring the models it trained on what they held out gives the run's own accuracy
    groups = [[r.model for r in result.parts or [result]]]
    accuracy = rebuilt.score(groups, dataset, tta=False)
    assert accuracy == pytest.approx(result.val_accuracy, abs=1e-6)

    # how a study of such runs is ranked, resumed, described and reproduced
    assert rebuilt.scored_by("val_accuracy") in ("val_accuracy", "oof_accuracy")
    assert rebuilt.objective_problem("val_accuracy") is None
    assert isinstance(rebuilt.fingerprint(), dict) and isinstance(rebuilt.command_options(), list)
    assert set(way.scores(result)) <= {"oof_accuracy", "oof_crossentropy"}


def test_an_ensemble_needs_one_way_of_validating():
    single = as_run({"split_seed": 1, "validation_fraction": 0.1})
    folded = as_run({"split_seed": 1, "validation_folds": 3}, "r2")
    assert validation.from_runs([single, single]) == validation.Holdout(0.1, seed=1)
    with pytest.raises(UserError, match="validated differently"):
        validation.from_runs([single, folded])
    with pytest.raises(UserError, match="records no validation split"):
        validation.from_run(as_run({"split_seed": 1}))
    assert validation.from_run(as_run({"refit_of": "x", "split_seed": 1})) == validation.AllImages()


def test_the_search_file_section_and_the_option(workdir):
    """`validation: {folds: K}` is a typed section of the search file; --folds replaces it."""
    from digitlab.search import search_file

    path = workdir / "s.yaml"
    base = "experiments: [basic_cnn]\nspace: {model.dropout: {type: float, low: 0.1, high: 0.5}}\n"
    path.write_text(base)
    assert search_file.load(path).validator == validation.Holdout()
    path.write_text(base + "validation: {folds: 5}\n")
    assert search_file.load(path).validator == validation.KFold(5)
    path.write_text(base + "validation: {folds: 0}\n")  # as files before the kinds said one split
    assert search_file.load(path).validator == validation.Holdout()
    path.write_text(base + "validation: {kind: kfold, folds: 5}\n")
    assert search_file.load(path).validator == validation.KFold(5)
    assert search_file.load(path, validation=validation.from_option(None, 3)).validator == validation.KFold(3)
    repeated = validation.from_option("repeated:repeats=3,fraction=0.2")
    assert search_file.load(path, validation=repeated).validator == validation.RepeatedHoldout(3, 0.2)
    for bad, message in (("1", "validation.folds must be a whole number of at least 2"),
                         ("true", "validation.folds: expected int, got True"),
                         ("-2", "validation.folds must be a whole number")):
        path.write_text(base + f"validation: {{folds: {bad}}}\n")
        with pytest.raises(ConfigError, match=f"^{path}: {message}"):
            search_file.load(path)
    path.write_text(base + "validation: {kind: kfold, fold: 3}\n")
    with pytest.raises(ConfigError, match=r"validation: unknown key 'fold' \(known: folds\)"):
        search_file.load(path)
    path.write_text(base + "validation: {kind: loo}\n")
    with pytest.raises(ConfigError, match=r"validation.kind must be one of holdout, kfold, repeated"):
        search_file.load(path)
    with pytest.raises(UserError, match="--folds must be at least 2"):
        validation.from_option(None, 1)
    for bad, message in (("repeated:repeats=1,fraction=0.2", "repeats must be a whole number of at least 2"),
                         ("kfold:5", "expected KIND:NAME=VALUE"), ("holdout:fraction=2", "between 0 and 1")):
        with pytest.raises(UserError, match=message):
            validation.from_option(bad)
    assert validation.from_option(None, 0) is None


def test_the_promotion_policy_is_typed(workdir):
    """registry/policy.yaml is built like an experiment file: a wrong type or an unknown
    key is a one-line error naming the file."""
    from digitlab import registry

    assert registry.policy().auto_ensemble_max == 10  # the shipped file
    (workdir / "registry").mkdir()
    policy_file = workdir / "registry" / "policy.yaml"
    policy_file.write_text("min_delta: 0.002\nauto_ensemble_max: 4\n")
    assert (registry.policy().min_delta, registry.policy().auto_ensemble_max) == (0.002, 4)
    for text, message in (("min_delta: lots\n", "min_delta: expected float, got 'lots'"),
                          ("gate: strict\n", "unknown key 'gate'"),
                          ("auto_ensemble_max: 0\n", "auto_ensemble_max must be at least 1")):
        policy_file.write_text(text)
        with pytest.raises(UserError, match=message) as refused:
            registry.policy()
        assert str(refused.value).startswith("registry/policy.yaml: ") and "\n" not in str(refused.value)
