"""A Kaggle competitor's path without traps: a gate that refuses stops `promote && submit`,
models trained on other data are neither compared nor submitted by mistake, and the study's
reproduce command runs on another machine."""

import pytest
from mlflow import MlflowClient

from digitlab import cli, data
from tests.conftest import TINY_SPACE


@pytest.fixture
def searched(workdir, tiny_dir):
    (workdir / "space.yaml").write_text(TINY_SPACE)
    assert cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)]) == 0
    return workdir


def production():
    return MlflowClient().get_model_version_by_alias("digit-recognizer", "production")


def test_promote_whose_gate_keeps_the_aliases_exits_3_and_says_so_last(searched, tiny_dir, capsys):
    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    capsys.readouterr()
    code = cli.main(["promote", "--ensemble", "2", "--min-delta", "1", "--data-dir", str(tiny_dir)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == cli.GATE_KEPT_ALIASES == 3
    assert out[0].startswith("registered digit-recognizer version 2")
    assert out[-1].startswith("version 2 (") and "does not beat production version 1" in out[-1]
    assert out[-1].endswith("aliases unchanged (--force overrides)")
    assert str(production().version) == "1"
    # promoting what is already production is no refusal
    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0


def test_a_refit_of_production_replaces_it_without_a_tie_with_its_own_source(searched, tiny_dir, capsys):
    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    trial = production().tags["members"]
    capsys.readouterr()
    # the refit's val_accuracy is its source trial's: a tie with production, which is that trial
    assert cli.main(["promote", "--refit", "--data-dir", str(tiny_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    version = production()
    assert str(version.version) == "2" and version.tags["refit_of"] == trial
    assert out[-1] == ("version 2 is now production (previous: version 1); it is production's "
                       "configuration trained again on every labelled image")


def test_a_version_trained_on_other_data_is_not_compared_by_its_scores(searched, tiny_dir, embedded_dir,
                                                                       workdir, capsys):
    # production was trained on the embedded demo; the candidate on the tiny data set
    (workdir / "demo.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 1"))
    assert cli.main(["search", "--space", "demo.yaml", "--max-epochs", "1",
                     "--data-dir", str(embedded_dir)]) == 0
    assert cli.main(["promote", "--data-dir", str(embedded_dir)]) == 0
    demo = production()
    capsys.readouterr()
    tiny = data.load(tiny_dir)
    search = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("digit-recognizer").experiment_id],
        "tags.search_study LIKE 'space-optuna-%'")[0]
    code = cli.main(["promote", "--search-run", search.info.run_id, "--data-dir", str(tiny_dir)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 3
    assert last == (f"version 2 was trained on data {tiny.digest[:12]}, production version 1 on "
                    f"{demo.tags['data_digest'][:12]}: their scores are not comparable; aliases "
                    "unchanged (--force overrides)")
    assert str(production().version) == "1"


def test_submit_names_what_it_exports_and_refuses_a_model_of_other_data(searched, tiny_dir, embedded_dir,
                                                                         workdir, capsys):
    assert cli.main(["promote", "--data-dir", str(tiny_dir)]) == 0
    capsys.readouterr()
    assert cli.main(["submit", "--data-dir", str(tiny_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    digest = data.load(tiny_dir).digest[:12]
    assert first == (f"wrote submissions/submission.csv: 50 rows from models:/digit-recognizer@production "
                     f"(version 1, trained on {tiny_dir} ({digest}))")
    before = (workdir / "submissions" / "submission.csv").read_bytes()
    # the embedded demo's test.csv is not what the production model was trained for
    assert cli.main(["submit", "--data-dir", str(embedded_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (
        f"digitlab: error: models:/digit-recognizer@production is version 1, trained on {tiny_dir} "
        f"({digest}), but {embedded_dir} holds data {data.load(embedded_dir).digest[:12]}: promote a "
        "model trained on it, or --force to submit this one anyway")
    assert (workdir / "submissions" / "submission.csv").read_bytes() == before  # nothing written
    assert cli.main(["submit", "--force", "--data-dir", str(embedded_dir)]) == 0
    written = (workdir / "submissions" / "submission.csv").read_text().splitlines()
    assert len(written) == 1001


def test_the_reproduce_tag_is_the_command_as_typed(workdir, tiny_dir):
    (workdir / "space.yaml").write_text(TINY_SPACE)
    assert cli.main(["search", "--space", "space.yaml", "--trials", "1", "--data-dir", str(tiny_dir)]) == 0
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("digit-recognizer").experiment_id],
        "tags.search_study LIKE 'space-optuna-%'")[0]
    reproduce = run.data.tags["reproduce"]
    assert reproduce.startswith("digitlab search --space space.yaml --engine optuna --trials 1 ")
    assert str(workdir) not in reproduce and run.data.params["space"] == "space.yaml"
    # a shipped file by name stays a name
    assert cli.main(["search", "--space", "quick", "--trials", "1", "--max-epochs", "1",
                     "--data-dir", str(tiny_dir)]) == 0
    quick = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("digit-recognizer").experiment_id],
        "tags.search_study LIKE 'quick-optuna-%'")[0]
    assert quick.data.tags["reproduce"].startswith("digitlab search --space quick --engine optuna ")


def test_the_same_search_on_other_data_starts_another_study(workdir, tiny_dir, embedded_dir, capsys):
    from digitlab import data

    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 1"))
    args = ["search", "--space", "space.yaml", "--max-epochs", "1"]
    assert cli.main([*args, "--data-dir", str(embedded_dir)]) == 0
    assert cli.main([*args, "--data-dir", str(tiny_dir)]) == 0
    client = MlflowClient()
    searches = client.search_runs([client.get_experiment_by_name("digit-recognizer").experiment_id],
                                  "tags.search_study LIKE 'space-optuna%'")
    # the demo keeps the plain name; other data gets its own study, trials and parent run
    assert sorted(r.data.tags["search_study"] for r in searches) == [
        "space-optuna", f"space-optuna-{data.load(tiny_dir).digest[:8]}"]
    digests = set()
    for search in searches:
        (trial,) = client.search_runs([search.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{search.info.run_id}'")
        digests.add(trial.data.params["data.digest"])
    assert digests == {data.EMBEDDED_DIGEST, data.load(tiny_dir).digest}
    # a named study on other data than its own is one line, and trains nothing
    capsys.readouterr()
    assert cli.main([*args, "--study", "space-optuna", "--data-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"digitlab: error: study 'space-optuna' was made on data {data.EMBEDDED_DIGEST[:12]}, but the "
        f"data directory holds {data.load(tiny_dir).digest[:12]}")
