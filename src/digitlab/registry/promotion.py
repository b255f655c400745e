"""The promote flow: select the runs, (refit them,) register, load-check, gate and move the
aliases."""

from __future__ import annotations

import logging

from mlflow import MlflowClient

from digitlab import data as data_mod
from digitlab.errors import UserError
from digitlab.registry import aliases, evaluation, packaging, selection
from digitlab.registry.promotion_policy import Policy
from digitlab.search import ensemble as ensemble_mod
from digitlab.search.ranking import ranked_trials

log = logging.getLogger("digitlab.registry")


def promote(dataset: data_mod.DigitData, policy: Policy, search_run_id: str | None = None,
            run_id: str | None = None, ensemble: int | str | None = None, tta: bool = False,
            min_delta: float | None = None, force: bool = False,
            refit: bool = False) -> tuple[bool, str, object]:
    """Select, (refit,) register, load-check, gate and move the aliases; returns whether
    the gate refused the version (it is registered, the aliases are not moved), the line
    that says what happened, and the version.

    By default (no run, ensemble or refit named) a search that trained final models
    promotes them (`search.final`), averaged; else its best trial. With `refit`, each
    member is first trained again on every labelled image (`digitlab.refit`); every
    refit's configuration and data are checked before the first one trains."""
    from digitlab import refit as refit_mod
    from digitlab import store

    client = MlflowClient()
    experiment_ids = [e] if (e := store.experiment_id()) else []
    weights, chosen = None, ""
    if ensemble is None and not run_id and not refit:
        _, search_run = selection.select(client, experiment_ids, search_run_id, None, 1)
        final_runs, final_weights = selection.final_models(client, search_run)
        if final_runs:
            chosen = ("final models weighted as greedy selection weighed their trials on the "
                      "trials' held-out predictions")
            return _register_and_gate(client, final_runs, search_run, tta, dataset, policy,
                                      final_weights or None, chosen, min_delta, force)
    ensemble = ensemble or 1
    if ensemble == "auto":
        if run_id:
            raise UserError("--ensemble auto chooses among a search's trials: give --search-run, not --run")
        _, search_run = selection.select(client, experiment_ids, search_run_id, None, 1)
        choice = ensemble_mod.choose(ranked_trials(client, search_run), policy.auto_ensemble_max)
        members, weights, chosen = choice.members, choice.weights, choice.describe()
        log.info("--ensemble auto: %s", chosen)
    else:
        members, search_run = selection.select(client, experiment_ids, search_run_id, run_id, ensemble)
    if refit:
        if done := [m.info.run_id for m in members if m.data.tags.get("refit_of")]:
            raise UserError(f"run {done[0]} is a refit already; promote it without --refit")
        packaging.check_data(members, dataset)
        configs = [refit_mod.refit_config(m) for m in members]
        members = [refit_mod.refit(m, dataset, c) for m, c in zip(members, configs, strict=True)]
    return _register_and_gate(client, members, search_run, tta, dataset, policy, weights, chosen,
                              min_delta, force)


def _register_and_gate(client, members, search_run, tta, dataset, policy, weights, chosen,
                       min_delta, force) -> tuple[bool, str, object]:
    version = packaging.register(members, search_run, tta, dataset, policy, weights, chosen)
    evaluation.load_check(policy.model_name, version.version, dataset, policy.load_check_rows)
    moved, message, refused = aliases.gate_and_move(
        client.get_model_version(policy.model_name, version.version), policy,
        policy.min_delta if min_delta is None else min_delta, force)
    return refused, message, version
