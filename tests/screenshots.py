"""The MLflow UI as a user sees it, rendered by headless Chromium (Debian's).

Used by tests/test_ui.py, and run as a script it makes the pictures of docs/ui.md:

    python -m tests.screenshots docs/images

which runs a short real search on the embedded data in a temporary folder, promotes the
best trial, then an ensemble of the best two over it (so `production` and `previous` both
exist), writes two submissions, starts `digitlab ui` and saves runs-table.png,
search-parent.png and registered-model.png (a few minutes on 2 cores).

Two ways to drive the browser: `page_text` is one `chromium --dump-dom` (and
`--screenshot`) call per page; `Browser` talks to one Chromium over its DevTools pipe,
so that a picture can show what a user gets after a click (a run's children expanded,
the assistant side panel closed, a few metric columns chosen) and the check can wait
for the page's own text instead of a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIGITLAB = Path(sys.executable).parent / "digitlab"
# As a sandboxed root process on a machine with no network: no GPU, no sandbox, no
# background connections (each would be refused, and Chromium retries them).
BASE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars"]
FLAGS = [*BASE_FLAGS, "--virtual-time-budget=30000"]
MODEL = "digit-recognizer"
PICTURES = ("runs-table.png", "search-parent.png", "registered-model.png")


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


class Browser:
    """One headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4,
    messages ending in NUL): no driver, no websocket library, the same flags."""

    def __init__(self, width: int = 1400, height: int = 900):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        chrome_reads, to_chrome = os.pipe()
        from_chrome, chrome_writes = os.pipe()

        def child_fds():  # its ends as fds 3 and 4, copied high first so neither clobbers
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (chrome_reads, chrome_writes)]
            for target, fd in zip((3, 4), high, strict=True):
                os.dup2(fd, target)

        self.proc = subprocess.Popen(
            [CHROMIUM, *BASE_FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(chrome_reads)
        os.close(chrome_writes)
        self._out = os.fdopen(to_chrome, "wb", buffering=0)
        self._in = os.fdopen(from_chrome, "rb", buffering=0)
        self._buffer, self._id, self.session = b"", 0, None
        try:
            page = next(t for t in self.call("Target.getTargets")["targetInfos"]
                        if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                     flatten=True)["sessionId"]
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self._out.write(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = self._in.read(1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed its pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str, ready: str, seconds: float = 90) -> str:
        """Loads `url` afresh and waits until its visible text holds `ready`; returns the text."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        return self.wait_for(ready, seconds)

    def wait_for(self, ready: str, seconds: float = 90) -> str:
        deadline = time.time() + seconds
        while True:
            text = self.text()
            if ready in text:
                time.sleep(1.5)  # fonts, icons and the last requests settle
                return self.text()
            if time.time() > deadline:
                raise AssertionError(f"{ready!r} never appeared; the page says: {text[:2000]}")
            time.sleep(0.5)

    def text(self) -> str:
        return " ".join((self.js("document.body ? document.body.innerText : ''") or "").split())

    def storage(self, origin: str, items: dict[str, str]) -> None:
        """Sets the UI's own saved state (localStorage) for `origin` before a page is opened."""
        self.call("Page.navigate", url=f"{origin}/health")
        self.wait_until("document.readyState === 'complete'")
        for key, value in items.items():
            self.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")

    def wait_until(self, expression: str, seconds: float = 30) -> None:
        deadline = time.time() + seconds
        while not self.js(expression):
            if time.time() > deadline:
                raise AssertionError(f"never true: {expression}")
            time.sleep(0.2)

    def click(self, selector: str, text: str) -> None:
        """Clicks the first element matching `selector` whose text is `text`."""
        found = self.js(f"""(() => {{
            const e = [...document.querySelectorAll({json.dumps(selector)})]
                .find(e => e.innerText.trim() === {json.dumps(text)});
            if (e) e.click();
            return Boolean(e);
        }})()""")
        if not found:
            raise AssertionError(f"no {selector} reading {text!r}: {self.text()[:2000]}")

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: Path, height: int | None = None) -> None:
        """A PNG of the viewport, cut to `height` pixels, as small as Pillow makes it."""
        from io import BytesIO

        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        image = Image.open(BytesIO(data))
        if height:
            image = image.crop((0, 0, image.width, min(height, image.height)))
        image = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        image.save(path, optimize=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        for stream in (getattr(self, "_out", None), getattr(self, "_in", None)):
            if stream:
                stream.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


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


def model_page(runs_url: str, name: str = MODEL) -> str:
    return f"{runs_url.split('/#/')[0]}/#/models/{name}?workflowType=machine_learning"


# The columns the runs-table picture shows besides MLflow's fixed ones (name, created,
# duration): Models, two metrics and the two sampled parameters of the quick search, and
# their widths (Dataset and Source, shown by default, are the same for every trial).
COLUMNS = {"attributes.`Run Name`": 250, "attributes.`Models`": 170,
           "metrics.`best_val_accuracy`": 150, "metrics.`holdout_accuracy`": 140,
           "params.`sampled.model.dropout`": 170, "params.`sampled.optimizer.learning_rate`": 230}


def ui_state(experiment_id: str, expanded: list[str]) -> dict[str, str]:
    """localStorage as MLflow 3's UI leaves it after a user closed the assistant panel,
    expanded these runs and picked COLUMNS in the experiment's runs table."""
    table = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
             "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
             "modelVersionFilter": "All Runs", "selectedColumns": list(COLUMNS)[1:],
             # the UI applies a saved width only to a column in its saved order
             "columnOrder": ["0", "attributes.`Run Name`", "runDateAndNestInfo", "duration",
                             *list(COLUMNS)[1:]],
             "columnWidths": COLUMNS, "runsPinned": [], "runsHidden": [],
             "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
             "runListHidden": False, "isAccordionReordered": False,
             "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
             "groupsExpanded": {}, "autoRefreshEnabled": True,
             "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                       "selectedXAxisMetricKey": ""},
             "runsExpanded": dict.fromkeys(expanded, True)}
    return {"mlflow.assistant.panelOpen_v1": "false",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState':
                json.dumps(table)}


def pictures(runs_url: str, search_run, expanded: list[str], out: Path) -> dict[str, str]:
    """The three pictures of docs/ui.md from the UI at `runs_url`: the runs table with
    `expanded` runs open, the search's parent run page, the registered model's page.
    Returns each page's visible text, by picture name."""
    origin = runs_url.split("/#/")[0]
    texts = {}
    with Browser(1700, 900) as browser:
        browser.storage(origin, ui_state(search_run.info.experiment_id, expanded))
        browser.open(runs_url, "matching runs")
        # the rows come after the count; a column that never shows means MLflow changed how
        # it saves its state
        for column in ("best_val_accuracy", "sampled.model.dropout"):
            texts["runs-table.png"] = browser.wait_for(column, 60)
        browser.screenshot(out / "runs-table.png", height=560)

        browser.resize(1600, 900)
        browser.open(run_page(runs_url, search_run.info.run_id), "Description")
        with contextlib.suppress(AssertionError):  # the whole description, as one click shows
            browser.click("button, a", "Show more")
        texts["search-parent.png"] = browser.wait_for("reproduce:")
        browser.screenshot(out / "search-parent.png", height=830)

        browser.resize(1600, 1000)
        texts["registered-model.png"] = browser.open(model_page(runs_url), "Version 1")
        browser.screenshot(out / "registered-model.png")
    return texts


def make(out: Path) -> None:
    """A short search, two promotions and two submits on the embedded data, then the pictures."""
    import mlflow
    from mlflow import MlflowClient

    from tests.conftest import free_port

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digitlab-screenshots-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    try:
        for args in (["search", "--space", "quick", "--trials", "3", "--max-epochs", "2"],
                     ["promote"], ["promote", "--ensemble", "2", "--force"],
                     ["submit"], ["submit", "--output", "submissions/again.csv"]):
            subprocess.run([str(DIGITLAB), *args], cwd=work, env=env, check=True, timeout=1800)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        (parent,) = mlflow.search_runs(experiment_names=[MODEL], output_format="list",
                                       filter_string="tags.search_study LIKE '%'")
        # production: the ensemble, whose serving run sits under the search; its two
        # submissions under that
        serving = MlflowClient().get_model_version_by_alias(MODEL, "production").run_id
        with ui(work, free_port(), env) as (url, _):
            pictures(url, parent, [parent.info.run_id, serving], out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in PICTURES:
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    make(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
