"""What a registered model is made of: the member runs' logged Keras models, downloaded
and load-checked, and the artifacts and weights the serving model (serving.py) averages."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
from mlflow.entities import Run

from digitlab import validation
from digitlab.errors import UserError, one_line


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


def gather(members: list[Run], weights: list[float] | None, folder: Path) -> tuple[dict, list, list]:
    """Every model of every member as one artifact in `folder` (serving.py averages
    member_*): a trial validated on several splits brings one model per split, so an
    ensemble of N such trials N x K. Returns the artifacts, how many models each member
    brought, and each model's weight (a member's weight shared by its models)."""
    artifacts, sizes, model_weights = {}, [], []
    for member, weight in zip(members, weights or [1.0] * len(members), strict=True):
        sources = keras_files(member)
        for source in sources:
            target = folder / f"member_{len(artifacts)}.keras"
            shutil.copyfile(source, target)
            check_member_loads(str(target), member.info.run_id)
            artifacts[target.stem] = str(target)
        sizes.append(len(sources))
        model_weights += [weight / len(sources)] * len(sources)
    return artifacts, sizes, model_weights
