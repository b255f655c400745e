"""Promotion, submission, scoring and serving against a real SQLite MLflow registry."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from digitlab import cli, registry, submission
from tests.conftest import REPO, TINY_SPACE, free_port

SPACE = TINY_SPACE.replace("sampler: tpe", "sampler: random").replace("low: 1.0e-3", "low: 1.0e-4")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_dir):
    """One finished search, made once; each test works on its own copy of the store."""
    root = tmp_path_factory.mktemp("searched")
    old = os.getcwd()
    os.chdir(root)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        (root / "space.yaml").write_text(SPACE)
        assert cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)]) == 0
    finally:
        os.chdir(old)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root


@pytest.fixture
def store(searched, workdir, tiny_dir, monkeypatch):
    shutil.copy(searched / "mlflow.db", workdir / "mlflow.db")
    shutil.copytree(REPO / "registry", workdir / "registry")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return workdir


def trials():
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("digit-recognizer").experiment_id
    search_run = registry.latest_search_run(client, [exp])
    return registry.ranked_trials(client, search_run), search_run


def promote(tiny_dir, *extra):
    return cli.main(["promote", "--data-dir", str(tiny_dir), *extra])


def production():
    return MlflowClient().get_model_version_by_alias("digit-recognizer", "production")


def test_tied_trials_rank_by_validation_loss(workdir):
    """Equal validation accuracy is common on a small validation set; the lower cross-entropy
    wins, whatever each trial's L2 penalty adds to its val_loss."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("ties")
    parent = client.create_run(exp, tags={"search_study": "ties"})
    client.log_param(parent.info.run_id, "objective.direction", "maximize")
    made = {}
    for name, objective, crossentropy, val_loss in (("c", 0.99, 0.03, 0.50), ("b", 0.98, 0.01, 0.01),
                                                    ("a", 0.99, 0.05, 0.05)):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id,
                                           "trial_state": "COMPLETE"})
        client.log_metric(run.info.run_id, "objective", objective)
        client.log_metric(run.info.run_id, "val_crossentropy", crossentropy)
        client.log_metric(run.info.run_id, "val_loss", val_loss)
        made[run.info.run_id] = name
    ranked = registry.ranked_trials(client, client.get_run(parent.info.run_id))
    assert [made[r.info.run_id] for r in ranked] == ["c", "a", "b"]


def test_ties_break_on_the_kept_model_not_the_last_epoch(workdir):
    """With restore_best a trial keeps an earlier epoch's weights: their cross-entropy counts."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("kept")
    parent = client.create_run(exp)
    client.log_param(parent.info.run_id, "objective.direction", "maximize")
    made = {}
    for name, last_epoch, kept in (("last-epoch-better", 0.02, 0.06), ("kept-better", 0.04, 0.03)):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id,
                                           "trial_state": "COMPLETE"})
        client.log_metric(run.info.run_id, "objective", 0.99)
        client.log_metric(run.info.run_id, "val_crossentropy", last_epoch)
        client.log_metric(run.info.run_id, "val_crossentropy_final_model", kept)
        made[run.info.run_id] = name
    ranked = registry.ranked_trials(client, client.get_run(parent.info.run_id))
    assert [made[r.info.run_id] for r in ranked] == ["kept-better", "last-epoch-better"]


def test_promote_names_the_search_it_cannot_see(workdir, tiny_dir, capsys):
    """A search logged into another experiment is named, with the flag that promotes it."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    other = client.create_experiment("elsewhere")
    search = client.create_run(other, tags={"search_study": "default-optuna"}).info.run_id
    assert promote(tiny_dir) == 2
    err = capsys.readouterr().err
    assert "no search run found in experiment 'digit-recognizer'" in err
    assert f"run {search} in experiment 'elsewhere': pass --search-run {search}" in err


def test_promote_registers_the_best_trial_and_submit_uses_it(store, tiny_dir, capsys):
    ranked, search_run = trials()
    assert promote(tiny_dir) == 0
    out = capsys.readouterr().out
    assert "version 1 is now production" in out
    version = production()
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["members"] == ranked[0].info.run_id
    assert tags["search_run_id"] == search_run.info.run_id
    assert tags["trial_number"] == ranked[0].data.tags["trial_number"]
    assert tags["load_check"] == "passed"
    assert 0 <= float(tags["holdout_accuracy"]) <= 1 and 0 <= float(tags["val_accuracy"]) <= 1
    assert len(tags["data_digest"]) == 64
    assert search_run.info.run_id in version.description and "validation accuracy" in version.description

    # the registered model takes test.csv rows as they are: 784 integer pixel columns, as
    # its input example shows (it checks its input itself: no input schema)
    model = mlflow.pyfunc.load_model("models:/digit-recognizer@production")
    assert model.metadata.get_input_schema() is None
    example = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"models:/digit-recognizer/{version.version}/serving_input_example.json")).read_text())
    assert example["dataframe_split"]["columns"] == [f"pixel{i}" for i in range(784)]
    assert model.metadata.get_output_schema().input_names()[:2] == ["label", "prob_0"]
    rows = pd.read_csv(tiny_dir / "test.csv").head(4)
    out_frame = model.predict(rows)
    assert list(out_frame.columns) == ["label", *[f"prob_{k}" for k in range(10)]]
    np.testing.assert_allclose(out_frame.iloc[:, 1:].sum(axis=1), 1.0, rtol=1e-4)
    local = mlflow.artifacts.download_artifacts(f"models:/digit-recognizer/{version.version}")
    assert (Path(local) / "input_example.json").exists()
    assert not list(Path(local).rglob("*.pkl"))  # model code and .keras files, no pickles

    assert cli.main(["submit", "--data-dir", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    path = store / "submissions" / "submission.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 51
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 51))
    accuracy = submission.score(path, tiny_dir / "solution.csv")
    assert f"holdout_accuracy {accuracy:.4f}" in out
    assert accuracy == pytest.approx(float(tags["holdout_accuracy"]))
    # traceable: a submit run with the file, linked both ways to the version
    submit_run_id = MlflowClient().get_model_version("digit-recognizer", "1").tags["last_submission_run_id"]
    submit_run = MlflowClient().get_run(submit_run_id)
    assert submit_run.data.tags["model_version"] == "1"
    # nested under the version's serving run, not a top-level row beside the search
    version_run_id = MlflowClient().get_model_version("digit-recognizer", "1").run_id
    assert submit_run.data.tags["mlflow.parentRunId"] == version_run_id
    assert submit_run.data.metrics["holdout_accuracy"] == pytest.approx(accuracy)
    assert mlflow.artifacts.load_text(f"runs:/{submit_run_id}/submission.csv") == path.read_text()


def test_promoting_the_same_run_twice_creates_no_second_version(store, tiny_dir, capsys):
    assert promote(tiny_dir) == 0
    assert promote(tiny_dir) == 0
    assert "already version 1" in capsys.readouterr().err
    assert len(MlflowClient().search_model_versions("name = 'digit-recognizer'")) == 1


def test_gate_force_and_rollback(store, tiny_dir, capsys):
    ranked, _ = trials()
    best, worst = ranked[0], ranked[-1]
    assert promote(tiny_dir, "--run", worst.info.run_id) == 0
    assert str(production().version) == "1"
    capsys.readouterr()
    # a candidate that is not better by at least min-delta leaves the aliases alone
    assert promote(tiny_dir, "--run", best.info.run_id, "--min-delta", "1") == 3  # beyond any gap
    assert "does not beat production version 1" in capsys.readouterr().out
    assert str(production().version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias("digit-recognizer", "previous")
    # --force overrides the gate; previous keeps the replaced version
    assert promote(tiny_dir, "--run", best.info.run_id, "--min-delta", "1", "--force") == 0
    assert str(production().version) == "2"
    assert MlflowClient().get_model_version_by_alias("digit-recognizer", "previous").version == 1
    assert promote(tiny_dir, "--rollback") == 0
    assert str(production().version) == "1"
    assert MlflowClient().get_model_version_by_alias("digit-recognizer", "previous").version == 2


def local_path(uri: str) -> Path:
    """An artifact location of the local store as a path (these tests damage its files)."""
    if uri.startswith("file://"):
        uri = urllib.request.url2pathname(uri.removeprefix("file://"))
    assert Path(uri).is_dir(), uri
    return Path(uri)


@contextlib.contextmanager
def damaged(folder: Path):
    """Every .keras file under `folder` overwritten on disk, as the copy in the fixture's
    shared store is, and put back afterwards for the other tests."""
    files = sorted(folder.rglob("*.keras"))
    assert files, folder
    saved = {f: f.read_bytes() for f in files}
    try:
        for f in files:
            f.write_bytes(b"not a keras archive")
        yield
    finally:
        for f, content in saved.items():
            f.write_bytes(content)


def test_rollback_onto_a_version_that_no_longer_loads_changes_nothing(store, tiny_dir, capsys):
    ranked, _ = trials()
    assert promote(tiny_dir, "--run", ranked[-1].info.run_id) == 0
    assert promote(tiny_dir, "--run", ranked[0].info.run_id, "--force") == 0
    client = MlflowClient()
    assert str(production().version) == "2"
    location = local_path(client.get_model_version_download_uri("digit-recognizer", "1"))
    capsys.readouterr()
    with damaged(location):
        assert promote(tiny_dir, "--rollback") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot roll back: version 1 failed its load check" in err
    assert str(production().version) == "2"
    assert client.get_model_version_by_alias("digit-recognizer", "previous").version == 1
    assert client.get_model_version("digit-recognizer", "1").tags["load_check"] == "failed"
    assert cli.main(["submit", "--data-dir", str(tiny_dir)]) == 0  # production still serves


def test_a_damaged_trial_model_is_a_one_line_error_even_forced(store, tiny_dir, capsys):
    ranked, _ = trials()
    assert promote(tiny_dir, "--run", ranked[0].info.run_id) == 0
    victim = ranked[-1].info.run_id
    (logged,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{victim}'",
                                            output_format="list")
    capsys.readouterr()
    with damaged(local_path(logged.artifact_location)):
        assert promote(tiny_dir, "--run", victim, "--force") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"run {victim}: its logged model cannot be loaded" in err
    assert str(production().version) == "1"
    assert len(MlflowClient().search_model_versions("name = 'digit-recognizer'")) == 1


def test_gate_compares_holdout_accuracy_on_the_same_data(store, tiny_dir):
    ranked, _ = trials()
    assert promote(tiny_dir, "--run", ranked[0].info.run_id) == 0
    client = MlflowClient()
    prod = production()
    client.set_model_version_tag("digit-recognizer", prod.version, "holdout_accuracy", "1.0")
    assert promote(tiny_dir, "--run", ranked[1].info.run_id) == 3  # registered, not promoted
    assert str(production().version) == str(prod.version)  # the candidate cannot beat 1.0


def test_a_version_that_fails_its_load_check_never_becomes_production(store, tiny_dir, monkeypatch, capsys):
    real = mlflow.pyfunc.load_model

    def broken(uri, *args, **kwargs):  # injected fault: the registered version will not load
        if str(uri).startswith("models:/digit-recognizer/"):
            raise OSError("injected: artifact store unreachable")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", broken)
    assert promote(tiny_dir) == 2
    assert "failed its load check" in capsys.readouterr().err
    client = MlflowClient()
    assert client.get_model_version("digit-recognizer", "1").tags["load_check"] == "failed"
    with pytest.raises(mlflow.exceptions.MlflowException):
        production()


def test_racing_promotions_end_on_the_better_model(store, tiny_dir):
    ranked, _ = trials()
    procs = [
        subprocess.Popen([sys.executable, "-m", "digitlab", "promote", "--run", run.info.run_id,
                          "--data-dir", str(tiny_dir)], cwd=store,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for run in (ranked[-1], ranked[0])
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    # each registers; the one that comes second moves the aliases only if it is better
    # (exit status 3 when the gate keeps them)
    assert all(p.returncode in (0, 3) for p in procs) and 0 in [p.returncode for p in procs], outputs
    versions = MlflowClient().search_model_versions("name = 'digit-recognizer'")
    assert len(versions) == 2
    winner = production()
    scores = [registry.comparable(v, v)[1] for v in versions]
    assert registry.comparable(winner, winner)[1] == max(scores)


def test_ensemble_with_tta_registers_one_version_and_submits(store, tiny_dir, capsys):
    ranked, _ = trials()
    assert promote(tiny_dir, "--ensemble", "2", "--tta") == 0
    version = production()
    assert version.tags["members"].split(",") == [r.info.run_id for r in ranked[:2]]
    assert version.tags["tta"] == "true"
    assert "ensemble of 2" in version.description
    assert cli.main(["submit", "--data-dir", str(tiny_dir), "--output", "out/ens.csv"]) == 0
    assert submission.score(Path("out/ens.csv"), tiny_dir / "solution.csv") == pytest.approx(
        float(version.tags["holdout_accuracy"]))


def test_an_ensemble_larger_than_the_completed_trials_is_a_clear_error(store, tiny_dir, capsys):
    ranked, _ = trials()
    assert promote(tiny_dir, "--ensemble", str(len(ranked) + 1)) == 2
    assert f"only {len(ranked)} completed trial" in capsys.readouterr().err
    assert MlflowClient().search_model_versions("name = 'digit-recognizer'") == []


def test_submit_without_production_is_a_clear_error(store, tiny_dir, capsys):
    assert cli.main(["submit", "--data-dir", str(tiny_dir)]) == 2
    assert "run `digitlab promote` first" in capsys.readouterr().err


def test_kaggle_submit_without_the_kaggle_command_fails_fast(store, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no kaggle command here
    assert cli.main(["submit", "--data-dir", str(tiny_dir), "--kaggle-submit"]) == 2
    assert "--kaggle-submit needs the `kaggle` command" in capsys.readouterr().err
    assert not (store / "submissions").exists()


def test_a_failed_write_keeps_the_earlier_submission(tmp_path):
    path = tmp_path / "submission.csv"
    submission.write(np.array([1, 2, 3]), path)
    before = path.read_text()
    with pytest.raises(submission.SubmissionError):
        submission.write(np.array([1, 12, 3]), path)  # label 12 fails validation
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temporary left


def test_kaggle_size_submission(tmp_path):
    labels = np.arange(28_000) % 10
    path = tmp_path / "submission.csv"
    submission.write(labels, path)
    solution = tmp_path / "solution.csv"
    solution.write_text("ImageId,Label\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(labels)))
    assert submission.score(path, solution) == 1.0


GOOD = "ImageId,Label\n1,3\n2,5\n3,0\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"ImageId","Label"\n1,3\n2,5\n3,0\n', "header is quoted"),
        ("Id,Label\n1,3\n2,5\n3,0\n", "header is 'Id,Label'"),
        ("3\n5\n0\n", "no header"),
        ("ImageId,Label\n0,3\n1,5\n2,0\n", "ImageId starts at 0"),
        ("ImageId,Label\n1,3\n1,5\n3,0\n", "line 3, column ImageId: 1 is duplicated"),
        ("ImageId,Label\n1,3\n2,5\n", "2 rows, expected 3"),
        ("ImageId,Label\n1,3\n2,5\n4,0\n", "line 4, column ImageId: 4 is outside 1..3"),
        ("ImageId,Label\n1,3\n2,5.0\n3,0\n", "line 3, column Label: '5.0' is not an integer"),
        ("ImageId,Label\n1,3\n2,15\n3,0\n", "line 3, column Label: 15 is outside 0-9"),
        ("ImageId,Label\n1,3,4\n2,5\n3,0\n", "line 2: 3 fields"),
        ("", "file is empty"),
    ],
)
def test_score_rejects_malformed_submissions(tmp_path, capsys, text, message):
    (tmp_path / "solution.csv").write_text(GOOD)
    (tmp_path / "sub.csv").write_text(text)
    assert cli.main(["score", str(tmp_path / "sub.csv"), str(tmp_path / "solution.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and "sub.csv" in err and len(err.strip().splitlines()) == 1


def test_score_as_kaggle(tmp_path, capsys):
    (tmp_path / "solution.csv").write_text(GOOD)
    (tmp_path / "sub.csv").write_text("ImageId,Label\n3,0\n1,3\n2,4\n")  # any order, one wrong
    assert cli.main(["score", str(tmp_path / "sub.csv"), str(tmp_path / "solution.csv")]) == 0
    assert "accuracy 0.66667" in capsys.readouterr().out




def test_mlflow_models_serve_answers_raw_pixel_rows(store, tiny_dir):
    """Named columns (any order) and bare rows of 784 both work; a bad row is a short error."""
    assert promote(tiny_dir) == 0
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         "models:/digit-recognizer@production", "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def ask(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(1)
        rows = pd.read_csv(tiny_dir / "test.csv").head(5)
        shuffled = rows[list(reversed(rows.columns))]
        named = ask({"dataframe_split": {"columns": list(shuffled.columns), "data": shuffled.values.tolist()}})
        bare = ask({"inputs": rows.values.tolist()})
        short = ask({"inputs": [row[:783] for row in rows.values.tolist()]})
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    # the server's own request lines, and no library line from loading the model
    told = server.stdout.read()
    assert not re.search(r"Warning|\x1b\[|^[IWEF]\d{4} |absl|oneDNN|cuda", told, re.M), told
    expected = mlflow.pyfunc.load_model("models:/digit-recognizer@production").predict(rows)["label"].tolist()
    assert all(0 <= label <= 9 for label in expected)
    for status, answer in (named, bare):
        assert status == 200, answer
        assert [p["label"] for p in answer["predictions"]] == expected
    status, answer = short
    assert status == 400 and len(answer["message"]) < 300 and "\n" not in answer["message"]
    assert "expected rows of 784 pixels, got shape (5, 783)" in answer["stack_trace"]


@pytest.mark.slow
def test_mlflow_run_promote_then_submit(store, tiny_dir):
    from tests.test_mlproject import mlflow_run

    proc = mlflow_run(store, "promote", f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = mlflow_run(store, "submit", f"data_dir={tiny_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (store / "submissions" / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 51
    assert production().tags["last_submission_run_id"]
