"""Kaggle submissions: predict test.csv, write `ImageId,Label` atomically, validate, score."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from digitlab import data as data_mod
from digitlab import osutil, registry
from digitlab.errors import UserError

HEADER = "ImageId,Label"


class SubmissionError(UserError):
    """A malformed submission or solution file; the message names file and line."""


def read_submission(path: Path, expected_rows: int | None = None) -> np.ndarray:
    """Labels of a submission in ImageId order, after checking it as Kaggle would."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SubmissionError(f"{path}: file is empty")
    header = lines[0].strip()
    if header != HEADER:
        if header.replace('"', "").replace("'", "") == HEADER:
            raise SubmissionError(f"{path}: line 1: header is quoted ({header}); expected {HEADER}")
        if header.split(",")[0].strip().lstrip("-").isdigit():
            raise SubmissionError(f"{path}: line 1: no header; expected {HEADER}")
        raise SubmissionError(f"{path}: line 1: header is {header!r}; expected {HEADER}")
    n = len(lines) - 1
    if n == 0:
        raise SubmissionError(f"{path}: no rows after the header")
    # Every ImageId is checked against the rows the file should have before it is stored:
    # the ids index an array of that size, never one as large as the largest id written.
    limit = expected_rows if expected_rows is not None else n
    ids, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2:
            raise SubmissionError(f"{path}: line {number}: {len(cells)} fields, expected 2 (ImageId,Label)")
        for column, cell in zip(("ImageId", "Label"), cells, strict=True):
            if not cell.lstrip("-").isdigit():
                raise SubmissionError(f"{path}: line {number}, column {column}: {cell!r} is not an integer")
            if len(cell.lstrip("-")) > 18:  # beyond any row count and int64; int() of it is slow
                raise SubmissionError(f"{path}: line {number}, column {column}: {cell[:24]}... is "
                                      f"outside {'1..' + str(limit) if column == 'ImageId' else '0-9'}")
        image_id, label = int(cells[0]), int(cells[1])
        if not 0 <= label <= 9:
            raise SubmissionError(f"{path}: line {number}, column Label: {label} is outside 0-9")
        ids.append(image_id)
        labels.append(label)
    ids_array = np.array(ids, dtype=np.int64)
    if ids_array.min() == 0:
        raise SubmissionError(f"{path}: ImageId starts at 0; Kaggle's ImageId runs 1..{limit}")
    if n != limit:
        raise SubmissionError(f"{path}: {n} rows, expected {expected_rows} (one per test image)")
    seen = np.zeros(limit + 1, dtype=bool)
    for number, image_id in enumerate(ids, start=2):
        if image_id < 1:
            raise SubmissionError(f"{path}: line {number}, column ImageId: {image_id} is below 1")
        if image_id > limit:
            raise SubmissionError(f"{path}: line {number}, column ImageId: {image_id} is outside "
                                  f"1..{limit} (one ImageId per test image)")
        if seen[image_id]:
            raise SubmissionError(f"{path}: line {number}, column ImageId: {image_id} is duplicated")
        seen[image_id] = True
    order = np.argsort(ids_array)
    return np.array(labels, dtype=np.int64)[order]


def read_solution(path: Path) -> np.ndarray:
    values = data_mod.read_csv(Path(path), data_mod.SOLUTION_HEADER)
    if not np.array_equal(values[:, 0], np.arange(1, len(values) + 1)):
        raise SubmissionError(f"{path}: ImageId must run 1..{len(values)} in order")
    return values[:, 1]


def score(submission: Path, solution: Path) -> float:
    """Accuracy, as Kaggle scores this competition."""
    truth = read_solution(solution)
    predicted = read_submission(submission, expected_rows=len(truth))
    return float(np.mean(predicted == truth))


def write(labels: np.ndarray, path: Path) -> None:
    """Write atomically, checked as Kaggle would read it before it replaces `path`."""
    text = io.StringIO()
    text.write(HEADER + "\n")
    np.savetxt(text, np.column_stack([np.arange(1, len(labels) + 1), labels]), fmt="%d", delimiter=",")
    osutil.atomic_write(Path(path), text.getvalue(),
                        check=lambda tmp: read_submission(tmp, expected_rows=len(labels)))


def check_kaggle() -> str:
    """The `kaggle` command and credentials, or a clear error before any work."""
    kaggle = shutil.which("kaggle")
    if kaggle is None:
        raise UserError("--kaggle-submit needs the `kaggle` command (pip install kaggle)")
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    has_env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    if not has_env and not (config_dir / "kaggle.json").is_file():
        raise UserError(f"--kaggle-submit needs Kaggle credentials: {config_dir}/kaggle.json "
                        "or KAGGLE_USERNAME and KAGGLE_KEY")
    return kaggle


def resolve_version(model_uri: str):
    """The registry version behind a models:/ URI (None for other URIs)."""
    if not model_uri.startswith("models:/"):
        return None
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    if ref:
        try:
            return client.get_model_version_by_alias(name, ref)
        except mlflow.exceptions.MlflowException:
            raise UserError(f"{model_uri}: no version of {name} has alias {ref!r}; "
                            "run `digitlab promote` first") from None
    name, _, number = model_uri.removeprefix("models:/").partition("/")
    return client.get_model_version(name, number)


def _version_run(version):
    """The run a registered version was logged from, if this store still has it."""
    if version is None or not version.run_id:
        return None
    try:
        return MlflowClient().get_run(version.run_id)
    except mlflow.exceptions.MlflowException:  # deleted, or the version came from elsewhere
        return None


def trained_on(version) -> str:
    """The data a registered version's model was trained on: source and short digest."""
    digest = version.tags.get("data_digest", "")[:12] or "unknown"
    source = version.tags.get("data_source")
    return f"{source} ({digest})" if source else f"data {digest}"


def check_data(version, dataset: data_mod.DigitData, model_uri: str) -> None:
    """A model trained on other data than the folder's train.csv predicts that folder's
    test.csv only with --force: a demo model's submission for Kaggle's test images is a
    file that uploads without an error and scores like a mistake."""
    if version is None or version.tags.get("data_digest") in (None, dataset.digest):
        return
    raise UserError(f"{model_uri} is version {version.version}, trained on {trained_on(version)}, "
                    f"but {dataset.source} holds data {dataset.digest[:12]}: promote a model "
                    "trained on it, or --force to submit this one anyway")


def submit(dataset: data_mod.DigitData, policy, model_uri: str | None = None, output: str | None = None,
           kaggle_submit: bool = False, force: bool = False) -> dict:
    from tqdm import tqdm

    from digitlab import tracking

    kaggle = check_kaggle() if kaggle_submit else None
    model_uri = model_uri or f"models:/{policy.model_name}@{policy.production_alias}"
    output_path = Path(output or policy.submission_path)
    version = resolve_version(model_uri)
    if not force:
        check_data(version, dataset, model_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    predicted = registry.predict_labels(
        model, registry.to_rows(dataset.test_images), policy.predict_batch_size,
        progress=lambda batches: tqdm(batches, desc="predicting test.csv", unit="batch"))
    write(predicted, output_path)

    result = {"path": str(output_path), "rows": len(predicted), "model_uri": model_uri,
              "version": version.version if version else None,
              "trained_on": trained_on(version) if version else None}
    tags = {"digitlab.kind": "submit", "model_uri": model_uri, "data_digest": dataset.digest}
    if version:
        tags.update(model_name=version.name, model_version=version.version,
                    model_run_id=version.run_id or "")
    # Nested under the version's serving run, where the registry links to: the runs table
    # keeps the searches at its top level however many submissions there are.
    parent = _version_run(version)
    with tracking.open_run(f"submit-v{version.version}" if version else "submit", tags=tags,
                           parent_run_id=parent.info.run_id if parent else None,
                           experiment_id=parent.info.experiment_id if parent else None) as run:
        mlflow.log_artifact(str(output_path))
        mlflow.log_metric("rows", len(predicted))
        if dataset.test_labels is not None:
            result["holdout_accuracy"] = float(np.mean(predicted == dataset.test_labels))
            mlflow.log_metric("holdout_accuracy", result["holdout_accuracy"])
        result["run_id"] = run.run_id
    if version:
        MlflowClient().set_model_version_tag(version.name, version.version, "last_submission_run_id",
                                             result["run_id"])
    if kaggle:
        message = f"digitlab {model_uri} (version {result['version']})"
        try:
            subprocess.run([kaggle, "competitions", "submit", "-c", "digit-recognizer", "-f",
                            str(output_path), "-m", message], check=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"kaggle upload failed: {exc}") from None
    return result
