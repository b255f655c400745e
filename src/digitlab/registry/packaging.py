"""Registration: the serving model of one or more runs packaged as MLflow model code
(serving.py), evaluated (`evaluation`), registered as a version with the tags and
description that say what it is; a version of the same runs is found, not made twice."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from digitlab import console, tracking, validation
from digitlab import data as data_mod
from digitlab.errors import UserError, one_line
from digitlab.registry.evaluation import evaluate, to_rows
from digitlab.registry.members import gather

log = logging.getLogger(__name__)


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
             policy, weights: list[float] | None = None, chosen: str = ""):
    """Log the serving model for the member runs and register it as a new version.

    `weights` (one per member, from `--ensemble auto`) weight the members' average, and
    `chosen` says in the description how they were chosen; without them, equal weights."""
    client = MlflowClient()
    key = source_key(members, tta, weights)
    if version := existing_version(client, policy.model_name, key):
        log.info("these runs are already version %s of %s; not registering again", version.version,
                 policy.model_name)
        return version
    check_data(members, dataset)
    scheme = validation.from_runs(members)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, sizes, model_weights = gather(members, weights, Path(tmp))
        with tracking.open_run(_run_name(members), experiment_id=members[0].info.experiment_id,
                               tags={"digitlab.kind": "promote", "source_key": key,
                                     "members": ",".join(m.info.run_id for m in members)},
                               parent_run_id=_parent(members, search_run)):
            model_uri, metrics = _log_and_evaluate(members, artifacts, sizes, model_weights, scheme,
                                                   dataset, policy, tta, weights)
            mlflow.log_metrics(metrics)
    with console.library_lines_hidden():
        version = mlflow.register_model(model_uri, policy.model_name)
    tags = version_tags(members, search_run, scheme, dataset, metrics, key, tta, weights, len(artifacts))
    for name, value in tags.items():
        client.set_model_version_tag(policy.model_name, version.version, name, value)
    client.update_model_version(policy.model_name, version.version, description=describe(
        members, search_run, scheme, dataset, metrics, tags, tta, chosen, len(artifacts)))
    return client.get_model_version(policy.model_name, version.version)


def _run_name(members: list[Run]) -> str:
    names = ", ".join(m.info.run_name for m in members)
    return f"serving {names}" if len(members) == 1 else f"ensemble of {len(members)}: {names}"


def _parent(members: list[Run], search_run: Run | None) -> str | None:
    """The version's source run sits under the trial it serves (or, for an ensemble, under
    the search), so the registry links back to them."""
    if len(members) == 1:
        return members[0].info.run_id
    return search_run.info.run_id if search_run else None


def _log_and_evaluate(members, artifacts, sizes, model_weights, scheme, dataset, policy, tta, weights):
    """The pyfunc model logged into the active run, loaded back and evaluated."""
    from mlflow.models import infer_signature

    from digitlab import serving

    try:
        # The signature states the output only: serving.to_images checks the input itself
        # (named columns in any order, or bare rows of 784 read as pixel0..pixel783).
        # MLflow's column schema would refuse bare rows (`{"inputs": [[...]]}`) with an
        # error that repeats the whole request; the input example documents the format.
        info = mlflow.pyfunc.log_model(
            name="model", python_model=serving.__file__, artifacts=artifacts,
            model_config={"tta": tta, **({"weights": model_weights} if unequal(weights) else {})},
            input_example=to_rows(dataset.test_images[:3]),
            signature=infer_signature(None, pd.DataFrame(
                {"label": [0], **{f"prob_{k}": [0.1] for k in range(10)}}).astype(
                {"label": "int64", **{f"prob_{k}": "float32" for k in range(10)}})),
            pip_requirements=[f"{p}=={v}" for p, v in tracking.package_versions().items()],
        )
        model = mlflow.pyfunc.load_model(info.model_uri)
        return info.model_uri, evaluate(model, members, scheme, sizes, dataset,
                                        policy.predict_batch_size, tta, weights)
    except Exception as exc:  # the packaged model fails where the members loaded
        runs = ", ".join(m.info.run_id for m in members)
        raise UserError(f"the serving model of run{'s' if len(members) > 1 else ''} {runs} "
                        f"failed to package or predict ({type(exc).__name__}: "
                        f"{one_line(exc)}); nothing registered, aliases unchanged") from None


def _is_final(members: list[Run]) -> bool:
    return all(m.data.tags.get("digitlab.kind") == "final" for m in members)


def version_tags(members, search_run, scheme, dataset, metrics, key, tta, weights, models) -> dict:
    """What a version records: its source, data, validation, members, weights and scores."""
    best, refit, final = members[0], not scheme.holds_out, _is_final(members)
    validated = metrics["source_val_accuracy" if refit else "val_accuracy"]
    tags = {
        "source_key": key,
        # For a refit, its source trials' (what the gate compares without a holdout)
        "val_accuracy": f"{validated:.6f}",
        "data_digest": dataset.digest,
        "data_source": dataset.source,
        "members": ",".join(m.info.run_id for m in members),
        "tta": str(tta).lower(),
        "ensemble_members": str(models),  # models averaged: members x splits
        "trial_number": best.data.tags.get("trial_number", ""),
        "search_run_id": search_run.info.run_id if search_run else "",
        **{k: str(v) for k, v in scheme.version_tags().items()},
    }
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
    return tags


def describe(members, search_run, scheme, dataset, metrics, tags, tta, chosen, models) -> str:
    """The version's description: what it is, where it comes from, how it scored."""
    best, refit, final = members[0], not scheme.holds_out, _is_final(members)
    kind = f"ensemble of {len(members)}" if len(members) > 1 else "single model"
    if models > len(members):  # members of several models each (one per split)
        plural = "s" if len(members) > 1 else ""
        kind = f"ensemble of {models} ({len(members)} trial{plural} x {models // len(members)} models)"
    validated = float(tags["val_accuracy"])
    sampled = {k: v for k, v in best.data.params.items() if k.startswith("sampled.")}
    trained = (f"{tags['final_passes']} passes ({int(tags['final_images']):,} images) each, seeds "
               f"{tags['final_seeds']}, weights {tags['final_weights']}" if final else
               f"{best.data.tags.get('refit_epochs')} epochs")
    return (
        f"{kind} from {'search run ' + search_run.info.run_id if search_run else 'run ' + best.info.run_id}"
        f" (trial {tags['trial_number'] or '-'}, experiment {best.data.tags.get('experiment')}); "
        + (f"trained on all {len(dataset.train_labels)} labelled images for {trained}; its source "
           f"trial{'s' if len(members) > 1 else ''}' validation accuracy {validated:.4f}"
           if refit else f"validation accuracy {validated:.4f}")
        + scheme.describe()
        + (f", holdout accuracy {metrics['holdout_accuracy']:.4f}" if "holdout_accuracy" in metrics else "")
        + ("; test-time augmentation" if tta else "")
        + (f"; {chosen}" if chosen else "")
        + (f"; parameters {sampled}" if sampled else "")
    )
