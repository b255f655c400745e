"""What a user browses: the URL `digitlab ui` prints, rendered by a real browser.

Headless Chromium (Debian's) renders the MLflow UI after a quick search; the checks
read the page's text, not its pixels. Screenshots stay in the test's temporary folder.
"""

import os

import mlflow
import pytest
from mlflow import MlflowClient

from digitlab import cli
from tests.conftest import TINY_SPACE, free_port, study_name
from tests.screenshots import CHROMIUM, PICTURES, page_text, pictures, run_page, ui


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true needs chromium for the UI check (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return CHROMIUM


@pytest.mark.slow
def test_the_printed_url_shows_the_search_and_its_trials(workdir, tiny_dir, browser):
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 2"))
    assert cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["digit-recognizer"],
                                                            output_format="list")}
    parent, trial = runs[study_name("space-optuna", tiny_dir)], runs["trial-0"]

    port = free_port()
    with ui(workdir, port) as (url, lines):
        assert url == (f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}/runs"
                       "?workflowType=machine_learning"), lines

        runs_page = page_text(url, workdir / "runs.png")
        # The model-training view (not GenAI's traces), the search's parent run, its two
        # trials and the parent in the run count.
        assert "Run Name" in runs_page and "Evaluation runs" not in runs_page, runs_page[:2000]
        assert "space-optuna" in runs_page and "digitlab search" in runs_page
        assert "3 matching runs" in runs_page, runs_page[:2000]

        parent_page = page_text(run_page(url, parent.info.run_id), workdir / "parent.png")
        assert "experiments: basic_cnn" in parent_page and "reproduce:" in parent_page
        trial_page = page_text(run_page(url, trial.info.run_id), workdir / "trial.png")
        assert "trial-0" in trial_page and "space-optuna" in trial_page  # its parent run, linked
        assert (workdir / "runs.png").stat().st_size > 10_000


@pytest.mark.slow
def test_after_promote_and_two_submits_the_runs_table_still_opens_on_the_search(
        workdir, tiny_dir, browser):
    """Submissions sit under the model version they came from, not beside the search."""
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 2"))
    data = ["--data-dir", str(tiny_dir)]
    assert cli.main(["search", "--space", "space.yaml", *data]) == 0
    assert cli.main(["promote", *data]) == 0
    assert cli.main(["submit", *data]) == 0
    assert cli.main(["submit", "--output", "submissions/again.csv", *data]) == 0

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    version = MlflowClient().get_model_version_by_alias("digit-recognizer", "production")
    submits = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                 filter_string="tags.`digitlab.kind` = 'submit'")
    assert len(submits) == 2
    assert {r.data.tags.get("mlflow.parentRunId") for r in submits} == {version.run_id}
    runs = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list")
    top_level = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in top_level] == [study_name("space-optuna", tiny_dir)]
    trial = mlflow.get_run(version.run_id).data.tags["mlflow.parentRunId"]  # the serving run's

    with ui(workdir, free_port()) as (url, _):
        # As the UI opens: top-level runs only, each with an expander for its children.
        runs_page = page_text(url, workdir / "runs.png")
        assert "space-optuna" in runs_page, runs_page[:2000]
        assert "submit-v" not in runs_page and "serving " not in runs_page, runs_page[:3000]
        # As docs/ui.md shows it (the same code makes its pictures): the search, the trial
        # and the version's serving run expanded, the two submissions under that.
        texts = pictures(url, top_level[0], [top_level[0].info.run_id, trial, version.run_id],
                         workdir)
    table = texts["runs-table.png"]
    assert table.count("submit-v1") == 2, table[:3000]
    assert (table.index("space-optuna") < table.index(f"trial-{version.tags['trial_number']}")
            < table.index("serving trial-") < table.index("submit-v1")), table[:3000]
    assert "reproduce:" in texts["search-parent.png"]
    assert "production" in texts["registered-model.png"], texts["registered-model.png"][:2000]
    assert all((workdir / name).stat().st_size > 10_000 for name in PICTURES)
