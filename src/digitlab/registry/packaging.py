"""The serving model of one or more runs: packaged as MLflow model code (serving.py),
evaluated through the same path `digitlab submit` and `mlflow models serve` use,
registered as a version, and load-checked before any alias moves."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import console, validation
from digitlab import data as data_mod
from digitlab.errors import UserError, one_line

log = logging.getLogger(__name__)


def _download(model, run_id: str) -> str:
    local = Path(mlflow.artifacts.download_artifacts(model.model_uri))
    found = sorted(local.rglob("*.keras"))
    if not found:
        raise UserError(f"run {run_id}: logged model {model.name} holds no .keras file")
    return str(found[0])


def _logged_models(run_id: str) -> list:
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    if not models:
        raise UserError(f"run {run_id} has no logged model")
    return models


def keras_file(run_id: str) -> str:
    """The native .keras file of a run's logged model, downloaded locally (a K-fold trial's
    first fold: `keras_files` gives all of a run's models)."""
    models = sorted(_logged_models(run_id), key=lambda m: m.name)
    return _download(models[0], run_id)


def keras_files(run: Run) -> list[str]:
    """Every model a run serves with, in order: its one model, or a K-fold trial's K fold
    models (`fold_1` ... `fold_K`), all of them or an error."""
    run_id = run.info.run_id
    by_name = {m.name: m for m in sorted(_logged_models(run_id), key=lambda m: m.name)}
    try:
        names = validation.from_run(run).model_names(list(by_name))
    except UserError as exc:
        raise UserError(f"run {run_id}: {exc}; nothing registered, aliases unchanged") from None
    return [_download(by_name[n], run_id) for n in names]


def check_member_loads(path: str, run_id: str) -> None:
    """A member's .keras file must load before it is packaged: a damaged one is named by run."""
    import keras

    try:
        keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise UserError(f"run {run_id}: its logged model cannot be loaded ({type(exc).__name__}: "
                        f"{one_line(exc)}); nothing registered, aliases unchanged") from None


def to_rows(images: np.ndarray) -> pd.DataFrame:
    """Model-input images back to Kaggle rows (integers 0-255, pixel0..pixel783)."""
    pixels = np.rint(images.reshape(len(images), -1) * 255).astype(np.int64)
    return pd.DataFrame(pixels, columns=data_mod.PIXEL_COLUMNS)


def predict_labels(model, rows: pd.DataFrame, batch_size: int,
                   progress: Callable[[range], range] = lambda batches: batches) -> np.ndarray:
    """Labels of `rows` from a pyfunc model, `batch_size` rows at a time (`progress` may wrap
    the batches in a progress bar)."""
    labels = [np.asarray(model.predict(rows.iloc[i : i + batch_size])["label"])
              for i in progress(range(0, len(rows), batch_size))]
    return np.concatenate(labels).astype(np.int64) if labels else np.empty(0, dtype=np.int64)


def is_refit(members: list[Run]) -> bool:
    return all(m.data.tags.get("refit_of") for m in members)


def source_val_accuracy(members: list[Run]) -> float:
    """A refit validates on nothing: the validation accuracy its source trials' own models
    scored (their mean, for an ensemble) stands in for it."""
    client = MlflowClient()
    values = [client.get_run(m.data.tags["refit_of"]).data.metrics.get("val_accuracy_final_model")
              for m in members]
    return float(np.mean(values)) if None not in values else float("nan")


def evaluate(model, members: list[Run], way, group_sizes: list[int], dataset: data_mod.DigitData,
             batch_size: int, tta: bool, weights: list[float] | None = None) -> dict:
    """Validation accuracy on the members' own split, holdout accuracy when labels exist.

    K-fold members are scored out of fold: each training image by the fold models that held
    it out (`folds.oof_probabilities`), not by all of them, most of which trained on it.
    Refits trained on every labelled image, so none is left to validate on: their source
    trials' validation accuracy is recorded instead (`source_val_accuracy`). `way`: how the
    members were validated (`validation.from_runs`); `group_sizes`: how many of the serving
    model's models each member brought (K for a K-fold trial).
    """
    if is_refit(members):
        metrics = {"source_val_accuracy": source_val_accuracy(members)}
    else:
        # by the serving code, on the images the members held out, as their runs recorded
        # them (`way`); the Keras models are the ones the serving model loaded, member by member
        served = iter(model.unwrap_python_model().models)
        models = [[next(served) for _ in range(n)] for n in group_sizes]
        metrics = {"val_accuracy": way.score(models, dataset, tta, weights)}
    if dataset.test_labels is not None:
        metrics["holdout_accuracy"] = float(np.mean(
            predict_labels(model, to_rows(dataset.test_images), batch_size) == dataset.test_labels))
    return metrics


def unequal(weights: list[float] | None) -> list[float] | None:
    """`weights` if they differ; equal ones are the plain average, the same model as a
    version of these members without weights (so `--ensemble auto` picking one trial alone
    finds the version that `--run` registered, and registers no second copy)."""
    return weights if weights and len({round(w, 9) for w in weights}) > 1 else None


def source_key(members: list[Run], tta: bool, weights: list[float] | None = None) -> str:
    key = ",".join(r.info.run_id for r in members) + f"|tta={int(tta)}"
    weights = unequal(weights)
    return key + (f"|weights={','.join(f'{w:.6g}' for w in weights)}" if weights else "")


def existing_version(client: MlflowClient, name: str, key: str):
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("source_key") == key:
                return version
    return None


def check_data(members: list[Run], dataset: data_mod.DigitData) -> None:
    """The members were trained on the data in the data directory (a refit trains on it)."""
    digests = {m.data.params.get("data.digest") for m in members}
    if digests != {dataset.digest}:
        raise UserError(f"the runs were trained on data {sorted(map(str, digests))[0][:12]}, but the "
                        f"data directory holds {dataset.digest[:12]}: pass the same --data-dir")


def register(members: list[Run], search_run: Run | None, tta: bool, dataset: data_mod.DigitData,
             pol, weights: list[float] | None = None, chosen: str = ""):
    """Log the serving model for the member runs and register it as a new version.

    `weights` (one per member, from `--ensemble auto`) weight the members' average, and
    `chosen` says in the description how they were chosen; without them, equal weights."""
    from mlflow.models import infer_signature

    from digitlab import serving, tracking

    client = MlflowClient()
    key = source_key(members, tta, weights)
    if version := existing_version(client, pol.model_name, key):
        log.info("these runs are already version %s of %s; not registering again", version.version,
                 pol.model_name)
        return version
    check_data(members, dataset)
    way = validation.from_runs(members)
    example = to_rows(dataset.test_images[:3])
    with tempfile.TemporaryDirectory() as tmp:
        # Every model of every member is one artifact (serving.py averages member_*): a
        # K-fold trial brings its K fold models, an ensemble of N such trials N x K.
        artifacts, sizes, model_weights = {}, [], []  # sizes: models of each member
        for member, weight in zip(members, weights or [1.0] * len(members), strict=True):
            sources = keras_files(member)
            for source in sources:
                target = Path(tmp) / f"member_{len(artifacts)}.keras"
                shutil.copyfile(source, target)
                check_member_loads(str(target), member.info.run_id)
                artifacts[target.stem] = str(target)
            sizes.append(len(sources))
            # a K-fold member's weight is shared by its fold models
            model_weights += [weight / len(sources)] * len(sources)
        kind = f"ensemble of {len(members)}" if len(members) > 1 else "single model"
        if len(artifacts) > len(members):  # members of several models each (K folds)
            plural = "s" if len(members) > 1 else ""
            kind = (f"ensemble of {len(artifacts)} ({len(members)} trial{plural} x "
                    f"{len(artifacts) // len(members)} models)")
        # The version's source run: nested under the trial it serves (or, for an ensemble,
        # under the search, named after its members), so the registry links back to them.
        names = ", ".join(m.info.run_name for m in members)
        single = len(members) == 1
        with tracking.open_run(
            f"serving {names}" if single else f"ensemble of {len(members)}: {names}",
            tags={"digitlab.kind": "promote", "source_key": key,
                  "members": ",".join(m.info.run_id for m in members)},
            parent_run_id=members[0].info.run_id if single else (
                search_run.info.run_id if search_run else None),
            experiment_id=members[0].info.experiment_id):
            try:
                # The signature states the output only: serving.to_images checks the input
                # itself (named columns in any order, or bare rows of 784 read as
                # pixel0..pixel783). MLflow's column schema would refuse bare rows
                # (`{"inputs": [[...]]}`) with an error that repeats the whole request; the
                # input example documents the format.
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=serving.__file__, artifacts=artifacts,
                    model_config={"tta": tta,
                                  **({"weights": model_weights} if unequal(weights) else {})},
                    input_example=example,
                    signature=infer_signature(None, pd.DataFrame(
                        {"label": [0], **{f"prob_{k}": [0.1] for k in range(10)}}).astype(
                        {"label": "int64", **{f"prob_{k}": "float32" for k in range(10)}})),
                    pip_requirements=[f"{p}=={v}" for p, v in tracking.package_versions().items()],
                )
                model = mlflow.pyfunc.load_model(info.model_uri)
                metrics = evaluate(model, members, way, sizes, dataset,
                                   pol.predict_batch_size, tta, weights)
            except Exception as exc:  # the packaged model fails where the members loaded
                runs = ", ".join(m.info.run_id for m in members)
                raise UserError(f"the serving model of run{'s' if len(members) > 1 else ''} {runs} "
                                f"failed to package or predict ({type(exc).__name__}: "
                                f"{one_line(exc)}); nothing registered, aliases unchanged") from None
            mlflow.log_metrics(metrics)
    with console.library_lines_hidden():
        version = mlflow.register_model(info.model_uri, pol.model_name)
    best = members[0]
    refit = is_refit(members)
    validated = metrics["source_val_accuracy" if refit else "val_accuracy"]
    tags = {
        "source_key": key,
        # For a refit, its source trials' (what the gate compares without a holdout)
        "val_accuracy": f"{validated:.6f}",
        "data_digest": dataset.digest,
        "data_source": dataset.source,
        "members": ",".join(m.info.run_id for m in members),
        "tta": str(tta).lower(),
        "ensemble_members": str(len(artifacts)),  # models averaged: members x folds
        "trial_number": best.data.tags.get("trial_number", ""),
        "search_run_id": search_run.info.run_id if search_run else "",
    }
    tags.update({k: str(v) for k, v in way.version_tags().items()})
    final = all(m.data.tags.get("digitlab.kind") == "final" for m in members)
    if weights and not final:
        tags["ensemble"] = "auto"
        tags["ensemble_weights"] = ",".join(
            f"{m.data.tags.get('trial_number', m.info.run_id)}:{w:.4g}" for m, w in zip(members, weights, strict=True))
    if refit:
        tags.update(refit="true", refit_of=",".join(m.data.tags["refit_of"] for m in members),
                    validation="none: refitted on every labelled image; val_accuracy is the "
                               "source trials'")
    if final:
        # what a final model is made of: its trials, length, seeds and weights
        tags.update(final="true", final_trials=",".join(m.data.tags.get("trial_number", "?") for m in members),
                    final_images=best.data.tags.get("final_images", ""),
                    final_passes=best.data.tags.get("final_passes", ""),
                    final_seeds=",".join(m.data.params.get("seed", "?") for m in members),
                    final_weights=",".join(f"{w:.4g}" for w in (weights or [1 / len(members)] * len(members))))
    if "holdout_accuracy" in metrics:
        tags["holdout_accuracy"] = f"{metrics['holdout_accuracy']:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(pol.model_name, version.version, key, value)
    sampled = {k: v for k, v in best.data.params.items() if k.startswith("sampled.")}
    description = (
        f"{kind} from {'search run ' + search_run.info.run_id if search_run else 'run ' + best.info.run_id}"
        f" (trial {tags['trial_number'] or '-'}, experiment {best.data.tags.get('experiment')}); "
        + (f"trained on all {len(dataset.train_labels)} labelled images for "
           + (f"{tags['final_passes']} passes ({int(tags['final_images']):,} images) each, seeds "
              f"{tags['final_seeds']}, weights {tags['final_weights']}" if final else
              f"{best.data.tags.get('refit_epochs')} epochs")
           + f"; its source trial{'s' if len(members) > 1 else ''}' validation accuracy {validated:.4f}"
           if refit else f"validation accuracy {validated:.4f}")
        + way.describe()
        + (f", holdout accuracy {metrics['holdout_accuracy']:.4f}" if "holdout_accuracy" in metrics else "")
        + ("; test-time augmentation" if tta else "")
        + (f"; {chosen}" if chosen else "")
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
