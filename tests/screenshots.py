"""The MLflow UI as a user sees it, rendered by headless Chromium (Debian's).

Used by tests/test_ui.py, and run as a script it makes the pictures of docs/ui.md:

    python -m tests.screenshots docs/images

which runs a short real search on the embedded data in a temporary folder, promotes the
best trial, writes two submissions, starts `digitlab ui` and saves runs-table.png,
search-parent.png and registered-model.png.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIGITLAB = Path(sys.executable).parent / "digitlab"
# As a sandboxed root process on a machine with no network: no GPU, no sandbox, no
# background connections (each would be refused, and Chromium retries them).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=30000"]


def _chromium(profile: Path, size: str) -> list[str]:
    return [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]


def page_text(url: str, screenshot: Path | None = None, size: str = "1400,1000") -> str:
    """The rendered page's visible text, after the UI's scripts have run; with `screenshot`,
    a PNG of the same page."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    try:
        dom = subprocess.run([*_chromium(profile, size), "--dump-dom", url], capture_output=True,
                             text=True, timeout=180).stdout
        if screenshot is not None:
            subprocess.run([*_chromium(profile, size), f"--screenshot={screenshot}", url],
                           capture_output=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@contextlib.contextmanager
def ui(cwd: Path, port: int, env: dict | None = None):
    """`digitlab ui` on `port` in `cwd`; yields the experiment's runs URL it prints."""
    from tests.conftest import wait_healthy

    proc = subprocess.Popen([str(DIGITLAB), "ui", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield lines[1].strip(), lines
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def run_page(runs_url: str, run_id: str) -> str:
    return f"{runs_url.split('/runs?')[0]}/runs/{run_id}?workflowType=machine_learning"


def model_page(runs_url: str, name: str = "digit-recognizer") -> str:
    return f"{runs_url.split('/#/')[0]}/#/models/{name}"


def make(out: Path) -> None:
    """A short search, promote and two submits on the embedded data, then the pictures."""
    from tests.conftest import free_port

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digitlab-screenshots-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    for args in (["search", "--space", "quick", "--trials", "3", "--max-epochs", "2"],
                 ["promote"], ["submit"], ["submit", "--output", "submissions/again.csv"]):
        subprocess.run([str(DIGITLAB), *args], cwd=work, env=env, check=True, timeout=1800)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (parent,) = mlflow.search_runs(experiment_names=["digit-recognizer"], output_format="list",
                                   filter_string="tags.search_study LIKE '%'")
    with ui(work, free_port(), env) as (url, _):
        page_text(url, out / "runs-table.png", size="1400,700")
        page_text(run_page(url, parent.info.run_id), out / "search-parent.png", size="1400,1000")
        page_text(model_page(url), out / "registered-model.png", size="1400,700")
    shutil.rmtree(work, ignore_errors=True)
    for name in ("runs-table.png", "search-parent.png", "registered-model.png"):
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    make(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
