"""The gate and the aliases: `production` (what is served and exported) moves only to a
version that beats it, the version it replaced becomes `previous`, and rollback swaps them
back once the returning version passes its load check again."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient

from digitlab import data as data_mod
from digitlab import osutil
from digitlab.errors import UserError
from digitlab.registry.evaluation import load_check


def comparable(candidate, current) -> tuple[str, float, float]:
    """Holdout accuracy on the same data when both have it, else validation accuracy: for a
    refit, which has no validation images left, the one its source trials scored."""
    c, p = candidate.tags, current.tags
    if "holdout_accuracy" in c and "holdout_accuracy" in p and c.get("data_digest") == p.get("data_digest"):
        return "holdout_accuracy", float(c["holdout_accuracy"]), float(p["holdout_accuracy"])
    metric = "val_accuracy" + (" of its source trials (a refit has no validation images left)"
                               if c.get("refit") == "true" else "")
    return metric, float(c.get("val_accuracy", "nan")), float(p.get("val_accuracy", "nan"))


def alias_lock(name: str):
    """Promotions from this folder move aliases one at a time (gate and move are one step);
    the lock file sits in the working directory with the store it guards."""
    return osutil.file_lock(Path(f".digitlab-promote-{name}.lock"))


def current(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _sources(version) -> set[str]:
    """The trial runs a version was trained from: its members, or what they refitted."""
    tags = version.tags
    return set(filter(None, (tags.get("refit_of") or tags.get("members", "")).split(",")))


def refusal(candidate, production, min_delta: float) -> str | None:
    """Why the gate keeps `production` rather than `candidate` (None: it moves).

    Scores of models trained on different data are not compared at all. A refit or final
    model whose source trials include everything production was made from is the same
    configuration trained on every labelled image, at least as long: like with like, so
    its source trials' validation score (the only one it has) tying production's is no
    reason to keep production."""
    c, p = candidate.tags, production.tags
    if c.get("data_digest") != p.get("data_digest"):
        return (f"version {candidate.version} was trained on data {str(c.get('data_digest'))[:12]}, "
                f"production version {production.version} on {str(p.get('data_digest'))[:12]}: "
                "their scores are not comparable")
    if c.get("refit") == "true" and _sources(production) <= _sources(candidate):
        return None
    metric, new, old = comparable(candidate, production)
    if not (new - old > 0 and new - old >= min_delta):
        return (f"version {candidate.version} ({metric} {new:.4f}) does not beat production "
                f"version {production.version} ({old:.4f}) by --min-delta {min_delta}")
    return None


def gate_and_move(candidate, policy, min_delta: float, force: bool) -> tuple[bool, str, bool]:
    """Move the aliases to `candidate` if the gate lets it through: (moved, the line that
    says what happened, whether the gate refused it)."""
    client = MlflowClient()
    name = policy.model_name
    with alias_lock(name):
        production = current(client, name, policy.production_alias)
        if production is not None and production.version == candidate.version:
            return False, f"version {candidate.version} is already {policy.production_alias}", False
        if production is not None and not force:
            if why := refusal(candidate, production, min_delta):
                return False, (f"{why.replace('production', policy.production_alias, 1)}; aliases "
                               "unchanged (--force overrides)"), True
        if production is not None:
            client.set_registered_model_alias(name, policy.previous_alias, production.version)
        client.set_registered_model_alias(name, policy.production_alias, candidate.version)
    replaced = f" (previous: version {production.version})" if production is not None else ""
    compared = ""
    if production is not None and not force:
        metric, new, old = comparable(candidate, production)
        compared = f"; compared {metric}: {new:.4f} against {old:.4f}"
        if candidate.tags.get("refit") == "true" and _sources(production) <= _sources(candidate):
            compared = (f"; it is {policy.production_alias}'s configuration trained again on every "
                        "labelled image")
    return True, f"version {candidate.version} is now {policy.production_alias}{replaced}{compared}", False


def rollback(policy, dataset: data_mod.DigitData) -> str:
    """Swap production and previous back, once the version that returns has passed the same
    load check a promotion gets (its files may have changed since it was production)."""
    client = MlflowClient()
    name = policy.model_name

    def aliased():
        production = current(client, name, policy.production_alias)
        previous = current(client, name, policy.previous_alias)
        if production is None or previous is None:
            raise UserError(f"nothing to roll back to: {name} needs both "
                            f"{policy.production_alias} and {policy.previous_alias} aliases")
        return production, previous

    with alias_lock(name):
        production, previous = aliased()
        try:
            load_check(name, previous.version, dataset, policy.load_check_rows)
        except UserError as exc:
            raise UserError(f"cannot roll back: {exc}") from None
        client.set_registered_model_alias(name, policy.production_alias, previous.version)
        client.set_registered_model_alias(name, policy.previous_alias, production.version)
    return (f"{policy.production_alias} is version {previous.version} again; "
            f"{policy.previous_alias} is version {production.version}")
