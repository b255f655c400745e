"""What a user browses: the URL `digitlab ui` prints, rendered by a real browser.

Headless Chromium (Debian's) renders the MLflow UI after a quick search; the checks
read the page's text, not its pixels. Screenshots stay in the test's temporary folder.
"""

import html
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from digitlab import cli
from tests.conftest import TINY_SPACE, free_port, wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true needs chromium for the UI check (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return CHROMIUM


def page_text(browser: str, url: str, screenshot: Path) -> str:
    """The rendered page's visible text, after the UI's scripts have run."""
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={screenshot.parent / 'chromium-profile'}",
             "--window-size=1400,1000", "--virtual-time-budget=30000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())




@pytest.mark.slow
def test_the_printed_url_shows_the_search_and_its_trials(workdir, tiny_dir, browser):
    (workdir / "space.yaml").write_text(TINY_SPACE.replace("trials: 3", "trials: 2"))
    assert cli.main(["search", "--space", "space.yaml", "--data-dir", str(tiny_dir)]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["digit-recognizer"],
                                                            output_format="list")}
    parent, trial = runs["space-optuna"], runs["trial-0"]

    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "digitlab"), "ui", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        lines = [ui.stdout.readline(), ui.stdout.readline()]
        url = lines[1].strip()
        assert url == (f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}/runs"
                       "?workflowType=machine_learning"), lines
        wait_healthy(f"http://127.0.0.1:{port}", ui)

        runs_page = page_text(browser, url, workdir / "runs.png")
        # The model-training view (not GenAI's traces), the search's parent run, its two
        # trials and the parent in the run count.
        assert "Run Name" in runs_page and "Evaluation runs" not in runs_page, runs_page[:2000]
        assert "space-optuna" in runs_page and "digitlab search" in runs_page
        assert "3 matching runs" in runs_page, runs_page[:2000]

        base = url.split("/runs?")[0]
        parent_page = page_text(browser, f"{base}/runs/{parent.info.run_id}?workflowType=machine_learning", workdir / "parent.png")
        assert "experiments: basic_cnn" in parent_page and "reproduce:" in parent_page
        trial_page = page_text(browser, f"{base}/runs/{trial.info.run_id}?workflowType=machine_learning", workdir / "trial.png")
        assert "trial-0" in trial_page and "space-optuna" in trial_page  # its parent run, linked
        assert (workdir / "runs.png").stat().st_size > 10_000
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
