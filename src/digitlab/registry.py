"""Promotion: select the best trial(s) of a search, register, load-check, gate, move aliases.

The one place that picks the best run. The policy (model name, gate, aliases)
is read from `registry/policy.yaml` when present; the defaults below match it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import data as data_mod
from digitlab.errors import UserError


@dataclass(frozen=True)
class Policy:
    model_name: str = "digit-recognizer"
    production_alias: str = "production"
    previous_alias: str = "previous"
    min_delta: float = 0.0
    load_check_rows: int = 5
    submission_path: str = "submissions/submission.csv"
    batch_size: int = 4096


def policy() -> Policy:
    """registry/policy.yaml of the working directory, else the shipped one."""
    from digitlab import resources

    path = resources.optional("registry", "policy.yaml")
    if path is None:
        return Policy()
    raw = yaml.safe_load(path.read_text()) or {}
    known = set(Policy.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return Policy(**raw)


# --- selecting runs -------------------------------------------------------------------


def latest_search_run(client: MlflowClient, experiment_ids: list[str]) -> Run:
    from digitlab import store

    def latest(ids: list[str]) -> Run | None:
        runs = client.search_runs(ids, filter_string="tags.search_study LIKE '%'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    if found := latest(experiment_ids):
        return found
    here = ", ".join(repr(client.get_experiment(i).name) for i in experiment_ids) or \
        repr(store.experiment_name())
    elsewhere = latest([e.experiment_id for e in client.search_experiments()])
    hint = (f"; the latest search is run {elsewhere.info.run_id} in experiment "
            f"{client.get_experiment(elsewhere.info.experiment_id).name!r}: pass --search-run "
            f"{elsewhere.info.run_id}" if elsewhere else "; run `digitlab search` first")
    raise UserError(f"no search run found in experiment {here}{hint}")


def ranked_trials(client: MlflowClient, search_run: Run) -> list[Run]:
    """The search's completed trials, best objective first.

    Validation accuracy moves in steps of one image (0.25 points on the embedded data's
    400), so the top trials often tie: the lower validation cross-entropy of the model the
    trial kept breaks the tie (not val_loss, which adds each trial's own L2 penalty), the
    run id after that. Runs logged before that metric existed fall back to the last epoch's.
    """
    direction = search_run.data.params.get("objective.direction", "maximize")
    trials = client.search_runs(
        [search_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{search_run.info.run_id}' "
                      "and tags.trial_state = 'COMPLETE'",
        max_results=5000,
    )
    trials = [t for t in trials if "objective" in t.data.metrics]
    sign = -1 if direction == "maximize" else 1

    def crossentropy(t: Run) -> float:
        m = t.data.metrics
        return m.get("val_crossentropy_final_model", m.get("val_crossentropy", math.inf))

    return sorted(trials, key=lambda t: (sign * t.data.metrics["objective"], crossentropy(t), t.info.run_id))


def select(client: MlflowClient, experiment_ids: list[str], search_run_id: str | None,
           run_id: str | None, ensemble: int) -> tuple[list[Run], Run | None]:
    """The member runs of the candidate (one, or the top K of a search) and their search."""
    if run_id:
        run = client.get_run(run_id)
        tags = run.data.tags
        if run.info.status == "FAILED" or tags.get("trial_state") == "FAIL":
            why = one_line(tags.get("error") or tags.get("fail_reason") or "no reason recorded")
            raise UserError(f"run {run_id} failed ({why}); a failed run is never promoted")
        parent_id = tags.get("mlflow.parentRunId")
        return [run], client.get_run(parent_id) if parent_id else None
    search_run = client.get_run(search_run_id) if search_run_id else latest_search_run(client, experiment_ids)
    trials = ranked_trials(client, search_run)
    if not trials:
        raise UserError(f"search run {search_run.info.run_id} has no completed trial to promote")
    if ensemble > len(trials):
        plural = "" if len(trials) == 1 else "s"
        raise UserError(f"--ensemble {ensemble}: the search has only {len(trials)} completed trial{plural}")
    return trials[: max(1, ensemble)], search_run


def keras_file(run_id: str) -> str:
    """The native .keras file of a run's logged model, downloaded locally."""
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    if not models:
        raise UserError(f"run {run_id} has no logged model")
    local = Path(mlflow.artifacts.download_artifacts(models[0].model_uri))
    found = sorted(local.rglob("*.keras"))
    if not found:
        raise UserError(f"run {run_id}: logged model holds no .keras file")
    return str(found[0])


def one_line(text: object, limit: int = 300) -> str:
    """The first line of an error, short enough for the CLI's one-line message."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def check_member_loads(path: str, run_id: str) -> None:
    """A member's .keras file must load before it is packaged: a damaged one is named by run."""
    import keras

    try:
        keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise UserError(f"run {run_id}: its logged model cannot be loaded ({type(exc).__name__}: "
                        f"{one_line(exc)}); nothing registered, aliases unchanged") from None


# --- evaluating through the serving path -------------------------------------------


def to_rows(images: np.ndarray) -> pd.DataFrame:
    """Model-input images back to Kaggle rows (integers 0-255, pixel0..pixel783)."""
    pixels = np.rint(images.reshape(len(images), -1) * 255).astype(np.int64)
    return pd.DataFrame(pixels, columns=data_mod.PIXEL_COLUMNS)


def predict_labels(model, rows: pd.DataFrame, batch_size: int) -> np.ndarray:
    labels = [np.asarray(model.predict(rows.iloc[i : i + batch_size])["label"])
              for i in range(0, len(rows), batch_size)]
    return np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)


def evaluate(model, members: list[Run], dataset: data_mod.DigitData, batch_size: int) -> dict:
    """Validation accuracy on the members' own split, holdout accuracy when labels exist."""
    params = members[0].data.params
    split_seed = params.get("training.split_seed", "None")  # runs logged before it existed lack it
    seed = int(params["seed"] if split_seed == "None" else split_seed)
    split = data_mod.split(dataset, float(params["training.validation_fraction"]), seed)
    metrics = {"val_accuracy": float(np.mean(
        predict_labels(model, to_rows(split.val_images), batch_size) == split.val_labels))}
    if dataset.test_labels is not None:
        metrics["holdout_accuracy"] = float(np.mean(
            predict_labels(model, to_rows(dataset.test_images), batch_size) == dataset.test_labels))
    return metrics


# --- registering ----------------------------------------------------------------------


def source_key(members: list[Run], tta: bool) -> str:
    return ",".join(r.info.run_id for r in members) + f"|tta={int(tta)}"


def existing_version(client: MlflowClient, name: str, key: str):
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("source_key") == key:
                return version
    return None


def register(members: list[Run], search_run: Run | None, tta: bool, dataset: data_mod.DigitData,
             pol: Policy):
    """Log the serving model for the member runs and register it as a new version."""
    from mlflow.models import infer_signature

    from digitlab import serving, tracking

    client = MlflowClient()
    key = source_key(members, tta)
    if version := existing_version(client, pol.model_name, key):
        print(f"these runs are already version {version.version} of {pol.model_name}; not registering again")
        return version
    digests = {m.data.params.get("data.digest") for m in members}
    if digests != {dataset.digest}:
        raise UserError(f"the runs were trained on data {sorted(digests)[0][:12]}, but the data "
                        f"directory holds {dataset.digest[:12]}: pass the same --data-dir")
    example = to_rows(dataset.test_images[:3])
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for i, member in enumerate(members):
            target = Path(tmp) / f"member_{i}.keras"
            shutil.copyfile(keras_file(member.info.run_id), target)
            check_member_loads(str(target), member.info.run_id)
            artifacts[f"member_{i}"] = str(target)
        kind = f"ensemble of {len(members)}" if len(members) > 1 else "single model"
        with tracking.open_run(f"promote-{members[0].info.run_name}",
                          tags={"digitlab.kind": "promote", "source_key": key}):
            try:
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=serving.__file__, artifacts=artifacts,
                    model_config={"tta": tta}, input_example=example,
                    signature=infer_signature(example, pd.DataFrame(
                        {"label": [0], **{f"prob_{k}": [0.1] for k in range(10)}}).astype(
                        {"label": "int64", **{f"prob_{k}": "float32" for k in range(10)}})),
                    pip_requirements=[f"{p}=={v}" for p, v in tracking.package_versions().items()],
                )
                model = mlflow.pyfunc.load_model(info.model_uri)
                metrics = evaluate(model, members, dataset, pol.batch_size)
            except Exception as exc:  # the packaged model fails where the members loaded
                runs = ", ".join(m.info.run_id for m in members)
                raise UserError(f"the serving model of run{'s' if len(members) > 1 else ''} {runs} "
                                f"failed to package or predict ({type(exc).__name__}: "
                                f"{one_line(exc)}); nothing registered, aliases unchanged") from None
            mlflow.log_metrics(metrics)
    version = mlflow.register_model(info.model_uri, pol.model_name)
    best = members[0]
    tags = {
        "source_key": key,
        "val_accuracy": f"{metrics['val_accuracy']:.6f}",
        "data_digest": dataset.digest,
        "members": ",".join(m.info.run_id for m in members),
        "tta": str(tta).lower(),
        "trial_number": best.data.tags.get("trial_number", ""),
        "search_run_id": search_run.info.run_id if search_run else "",
    }
    if "holdout_accuracy" in metrics:
        tags["holdout_accuracy"] = f"{metrics['holdout_accuracy']:.6f}"
    for k, v in tags.items():
        client.set_model_version_tag(pol.model_name, version.version, k, v)
    sampled = {k: v for k, v in best.data.params.items() if k.startswith("sampled.")}
    description = (
        f"{kind} from {'search run ' + search_run.info.run_id if search_run else 'run ' + best.info.run_id}"
        f" (trial {tags['trial_number'] or '-'}, experiment {best.data.tags.get('experiment')}); "
        f"validation accuracy {metrics['val_accuracy']:.4f}"
        + (f", holdout accuracy {metrics['holdout_accuracy']:.4f}" if "holdout_accuracy" in metrics else "")
        + ("; test-time augmentation" if tta else "")
        + (f"; parameters {sampled}" if sampled else "")
    )
    client.update_model_version(pol.model_name, version.version, description=description)
    return client.get_model_version(pol.model_name, version.version)


def load_check(name: str, version: str, dataset: data_mod.DigitData, rows: int) -> None:
    """The registered version must load and predict valid labels before any alias moves."""
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        out = model.predict(to_rows(dataset.test_images[:rows]))
        labels = np.asarray(out["label"])
        if len(labels) != rows or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"predicted {labels!r}")
    except Exception as exc:
        MlflowClient().set_model_version_tag(name, version, "load_check", "failed")
        raise UserError(f"version {version} failed its load check ({type(exc).__name__}: "
                        f"{one_line(exc)}); aliases unchanged") from None
    MlflowClient().set_model_version_tag(name, version, "load_check", "passed")


# --- gate and aliases -------------------------------------------------------------------


def comparable(candidate, current) -> tuple[str, float, float]:
    """Holdout accuracy on the same data when both have it, else validation accuracy."""
    c, p = candidate.tags, current.tags
    if "holdout_accuracy" in c and "holdout_accuracy" in p and c.get("data_digest") == p.get("data_digest"):
        return "holdout_accuracy", float(c["holdout_accuracy"]), float(p["holdout_accuracy"])
    return "val_accuracy", float(c.get("val_accuracy", "nan")), float(p.get("val_accuracy", "nan"))


@contextlib.contextmanager
def alias_lock(name: str):
    """Promotions on this machine move aliases one at a time (gate and move are one step)."""
    path = Path(tempfile.gettempdir()) / f"digitlab-promote-{name}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def gate_and_move(candidate, pol: Policy, min_delta: float, force: bool) -> tuple[bool, str]:
    client = MlflowClient()
    name = pol.model_name
    with alias_lock(name):
        production = current(client, name, pol.production_alias)
        if production is not None and production.version == candidate.version:
            return False, f"version {candidate.version} is already {pol.production_alias}"
        if production is not None and not force:
            metric, new, old = comparable(candidate, production)
            if not (new - old > 0 and new - old >= min_delta):
                return False, (f"version {candidate.version} ({metric} {new:.4f}) does not beat "
                               f"{pol.production_alias} version {production.version} ({old:.4f}) by "
                               f"--min-delta {min_delta}; aliases unchanged (--force overrides)")
        if production is not None:
            client.set_registered_model_alias(name, pol.previous_alias, production.version)
        client.set_registered_model_alias(name, pol.production_alias, candidate.version)
    replaced = f" (previous: version {production.version})" if production is not None else ""
    return True, f"version {candidate.version} is now {pol.production_alias}{replaced}"


def rollback(pol: Policy, data_dir: str | None = None) -> str:
    """Swap production and previous back, once the version that returns has passed the same
    load check a promotion gets (its files may have changed since it was production)."""
    client = MlflowClient()
    name = pol.model_name

    def aliased():
        production = current(client, name, pol.production_alias)
        previous = current(client, name, pol.previous_alias)
        if production is None or previous is None:
            raise UserError(f"nothing to roll back to: {name} needs both "
                            f"{pol.production_alias} and {pol.previous_alias} aliases")
        return production, previous

    aliased()  # before the data are loaded (the default directory is written on first use)
    dataset = data_mod.load(data_dir)
    with alias_lock(name):
        production, previous = aliased()
        try:
            load_check(name, previous.version, dataset, pol.load_check_rows)
        except UserError as exc:
            raise UserError(f"cannot roll back: {exc}") from None
        client.set_registered_model_alias(name, pol.production_alias, previous.version)
        client.set_registered_model_alias(name, pol.previous_alias, production.version)
    return (f"{pol.production_alias} is version {previous.version} again; "
            f"{pol.previous_alias} is version {production.version}")


def promote(search_run_id: str | None = None, run_id: str | None = None, ensemble: int = 1,
            tta: bool = False, min_delta: float | None = None, force: bool = False,
            data_dir: str | None = None) -> tuple[bool, str, object]:
    pol = policy()
    dataset = data_mod.load(data_dir)
    client = MlflowClient()
    from digitlab import store

    experiment_ids = [e] if (e := store.experiment_id()) else []
    members, search_run = select(client, experiment_ids, search_run_id, run_id, ensemble)
    version = register(members, search_run, tta, dataset, pol)
    load_check(pol.model_name, version.version, dataset, pol.load_check_rows)
    moved, message = gate_and_move(client.get_model_version(pol.model_name, version.version), pol,
                                   pol.min_delta if min_delta is None else min_delta, force)
    return moved, message, version
