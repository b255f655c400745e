"""Runs, studies and registered versions made by the version before the validation kinds
still resume, rank, promote and submit.

tests/fixtures/old-store.tar.gz is an MLflow store (SQLite and its artifacts) and an Optuna
journal made by that version (commit 6f45a28) on `tiny_dir`'s data: `digitlab search` of
tiny.yaml (one holdout split, 2 trials) and of kfold.yaml (`validation: {folds: 2}`), then
`digitlab promote` (version 1, production: the K-fold trial's two fold models). Its runs
carry the tags of that time: no `validation` kind tag, `validation_fraction` or
`validation_folds`.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from digitlab import cli, validation
from tests.conftest import REPO

pytestmark = pytest.mark.slow

MADE_IN = "/tmp/oldstore/work"  # where the store was made: its absolute artifact paths


def unpack(workdir: Path) -> None:
    with tarfile.open(REPO / "tests" / "fixtures" / "old-store.tar.gz") as tar:
        tar.extractall(workdir, filter="data")
    with sqlite3.connect(workdir / "mlflow.db") as db:  # artifact locations, moved here
        for (table,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
            for column in db.execute(f"pragma table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(f'update "{table}" set "{column[1]}" = replace("{column[1]}", ?, ?)',
                               (MADE_IN, str(workdir)))


def searches() -> dict[str, str]:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                              filter_string="tags.search_study LIKE '%'")
    return {r.data.tags["search_study"]: r.info.run_id for r in runs}


def test_an_old_store_resumes_ranks_promotes_and_submits(workdir, tiny_dir, capsys):
    unpack(workdir)
    studies = searches()
    assert set(studies) == {"tiny-optuna-9daac17f", "kfold-optuna-2fold-9daac17f"}
    client = MlflowClient()

    # validations rebuilt from the old tags
    trials = {name: client.search_runs([client.get_run(run).info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{run}'") for name, run in studies.items()}
    assert {type(validation.from_run(t)) for t in trials["tiny-optuna-9daac17f"]} == {validation.Holdout}
    assert {validation.from_run(t).n_splits for t in trials["kfold-optuna-2fold-9daac17f"]} == {2}

    # the same command finds its study finished; one more trial resumes it
    for space in ("tiny.yaml", "kfold.yaml"):
        assert cli.main(["search", "--space", space, "--data-dir", str(tiny_dir)]) == 0
    err = capsys.readouterr().err  # both fingerprints as the old version computed them
    assert "'tiny-optuna-9daac17f' is already finished" in err
    assert "'kfold-optuna-2fold-9daac17f' is already finished" in err
    assert cli.main(["search", "--space", "kfold.yaml", "--data-dir", str(tiny_dir), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "kfold-optuna-2fold-9daac17f: 3 COMPLETE" in out

    # old and new trials rank together and promote as one ensemble, through the gate
    assert cli.main(["promote", "--data-dir", str(tiny_dir), "--search-run", studies["kfold-optuna-2fold-9daac17f"],
                     "--ensemble", "2", "--force"]) == 0
    version = client.get_model_version_by_alias("digit-recognizer", "production")
    assert str(version.version) == "2" and version.tags["ensemble_members"] == "4"
    assert version.tags["validation"] == "kfold" and version.tags["validation_folds"] == "2"
    # the old search's holdout trials promote too, and the old version rolls back
    assert cli.main(["promote", "--data-dir", str(tiny_dir), "--search-run", studies["tiny-optuna-9daac17f"],
                     "--force"]) == 0
    assert cli.main(["promote", "--rollback"]) == 0
    csv = workdir / "submissions" / "old.csv"
    assert cli.main(["submit", "--data-dir", str(tiny_dir), "--output", str(csv)]) == 0
    assert len(csv.read_text().splitlines()) == 51
