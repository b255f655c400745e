"""The `digitlab` command: parse, check the input, call the library, print the outcome.

Input (data directory, experiment, overrides, search file, policy) is checked
before TensorFlow is imported, so a mistake is reported in a second, on one line.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from digitlab import console
from digitlab.cli_parser import build_parser
from digitlab.errors import SearchFailed, Terminated, TrainingFailed, UserError

# `digitlab promote`'s exit status when it registered a version but the gate kept the
# aliases where they were (2 is bad input, 1 a failed run).
GATE_KEPT_ALIASES = 3


def _keras_verbosity() -> int:
    """Keras's progress bar on a terminal, a line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _experiment_config(name: str, args):
    """The experiment with --set overrides, then --epochs/--seed: each value checked."""
    from digitlab import config

    overrides = dict(config.parse_override(p) for given in args.set or []
                     for p in config.split_overrides(given))
    cfg = config.load_experiment(name, overrides)
    options = {}
    if args.epochs:  # 0 keeps the experiment's own (the MLproject default)
        options["training.epochs"] = args.epochs
    if args.seed is not None:
        options["seed"] = args.seed
    return config.apply_overrides(cfg, options) if options else cfg


def _browse(uri: str, run_id: str) -> str:
    from digitlab import store

    experiment = store.experiment_id()
    if uri.startswith(("http://", "https://")):
        return f"browse it at {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return (f"browse it with: digitlab ui, then "
            f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}")


def cmd_data(args) -> int:
    from digitlab import data

    directory = Path(args.data_dir)
    if not directory.exists():
        # A folder the user named for their own data gets no demo in it: a mistyped path
        # would otherwise hold the demo, and every later command would train on it.
        if directory != data.DEFAULT_DATA_DIR and not args.demo:
            raise UserError(f"{directory}: data directory not found (nothing written); "
                            "--demo writes the embedded MNIST subset there")
        data.write_embedded(directory)
        print(f"wrote the embedded MNIST subset to {directory}/ in Kaggle layout")
    elif args.demo:
        raise UserError(f"{directory} exists: --demo writes the embedded subset only into a new folder")
    print(data.describe(data.load(directory)))
    return 0


def cmd_train(args) -> int:
    from digitlab import data, validation

    cfg = _experiment_config(args.experiment, args)
    # checked before anything (a cache) is written into the user's data folder
    dataset = data.load(args.data_dir, lambda d: validation.default().check(d, cfg))
    console.import_backend()
    from digitlab import store, train, training_run

    uri = store.configure()
    print(train.length_line(cfg, dataset), flush=True)  # what it trains and for how long, first
    run_id, result, _ = training_run.tracked_run(cfg, dataset, verbose=_keras_verbosity())
    line = f"{cfg.name}: best val_accuracy {result.best_val_accuracy:.4f}"
    if result.holdout_accuracy is not None:
        line += f", holdout_accuracy {result.holdout_accuracy:.4f}"
    print(f"{line}\nMLflow run {run_id} in {uri}\n{_browse(uri, run_id)}")
    return 0


def cmd_compare(args) -> int:
    from digitlab import config, data, validation

    names = [n for n in args.experiments.replace(",", " ").split() if n]
    if names == ["all"]:
        names = config.available_experiments()
    configs = [_experiment_config(n, args) for n in names]

    def check(dataset) -> None:
        for cfg in configs:
            validation.default().check(dataset, cfg)

    dataset = data.load(args.data_dir, check)
    console.import_backend()
    from digitlab import compare, store

    uri = store.configure()
    table = compare.compare(configs, dataset, verbose=_keras_verbosity())
    print()
    print(table.drop(columns=["run_id"]).to_string(index=False, float_format="{:.4f}".format))
    print(f"\ncomparison logged to {uri}")
    return 0


def cmd_search(args) -> int:
    from digitlab import config, data, search, validation

    settings = search.make_settings(
        args.space, engine=args.engine, trials=args.trials, max_epochs=args.max_epochs,
        minutes=args.minutes, workers=args.workers, storage=args.storage or None,
        study=args.study or None, data_dir=args.data_dir, seed=args.seed,
        validation=validation.from_option(args.validation, args.folds),
    )

    def check(dataset) -> None:
        for name in settings.study_file.experiments:
            settings.validation.check(dataset, config.load_experiment(name, settings.study_file.fixed))

    dataset = data.load(settings.data_dir, check)
    settings = search.for_data(settings, dataset.digest, named=bool(args.study))
    console.import_backend()
    summary = search.run_study(settings, dataset)
    if summary.get("already_finished"):
        return 0
    best = summary["best"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    print(f"study {summary['study']}: {states}")
    if summary["out_of_time"]:
        # Said here because `promote --ensemble K` needs K completed trials, and on a slow
        # machine the budget may complete fewer: running the search again adds more.
        completed = summary["states"].get("COMPLETE", 0)
        print(f"the trials' time was used up before all {settings.trials} trials, {completed} "
              "completed (an ensemble of K needs K); the same command goes on with the study")
    if not best:  # nothing to promote: a failed search, as Optuna users expect
        from digitlab.search import parent_run, report

        print(f"digitlab: {report.nothing_completed(summary['rows'], parent_run.failure_reasons(summary['rows']))}", file=sys.stderr)
        return 1
    metric = settings.study_file.scored_by + settings.validation.metric_note()
    print(f"best trial {best['number']}: {metric} {best['value']:.4f} (MLflow run {best['run_id']})")
    if refitted := summary.get("refit_run_id"):
        print(f"refitted trial {best['number']} on every labelled image: MLflow run {refitted}")
    if finals := summary.get("final_run_ids"):
        print(f"final training: {len(finals)} model{'s' if len(finals) > 1 else ''} on every labelled "
              f"image (MLflow run{'s' if len(finals) > 1 else ''} {', '.join(finals)}); "
              "promote registers their weighted average")
    print(f"parent MLflow run {summary['parent_run_id']}; next: digitlab promote"
          + (" --refit" if summary.get("refit_run_id") else ""))
    return 0


def cmd_promote(args) -> int:
    from digitlab import data, registry

    if args.min_delta is not None and not math.isfinite(args.min_delta):
        raise UserError("--min-delta must be a finite number")
    policy = registry.policy()
    dataset = data.load(args.data_dir)
    console.import_backend()
    from digitlab import store

    store.configure()
    if args.rollback:
        print(registry.rollback(policy, dataset))
        return 0
    refused, message, version = registry.promote(
        dataset, policy, search_run_id=args.search_run or None, run_id=args.run or None,
        ensemble=args.ensemble, tta=args.tta, min_delta=args.min_delta, force=args.force,
        refit=args.refit,
    )
    tags = version.tags
    print(f"registered {version.name} version {version.version}: val_accuracy {tags.get('val_accuracy')}"
          + (f", holdout_accuracy {tags['holdout_accuracy']}" if "holdout_accuracy" in tags else ""))
    print(message)
    # Registered but not promoted: a script's `promote && submit` must stop here, or it
    # would export the production model it meant to replace.
    return GATE_KEPT_ALIASES if refused else 0


def cmd_submit(args) -> int:
    from digitlab import data, registry

    policy = registry.policy()
    dataset = data.load(args.data_dir)
    console.import_backend()
    from digitlab import store, submission

    store.configure()
    result = submission.submit(dataset, policy, model_uri=args.model_uri or None,
                               output=args.output or None, kaggle_submit=args.kaggle_submit,
                               force=args.force)
    print(f"wrote {result['path']}: {result['rows']} rows from {result['model_uri']}"
          + (f" (version {result['version']}, trained on {result['trained_on']})"
             if result["version"] else ""))
    if "holdout_accuracy" in result:
        print(f"holdout_accuracy {result['holdout_accuracy']:.4f}")
    print(f"recorded in MLflow run {result['run_id']}")
    return 0


def cmd_score(args) -> int:
    from digitlab import submission

    print(f"accuracy {submission.score(Path(args.submission), Path(args.solution)):.5f}")
    return 0


def cmd_server(args) -> int:
    from digitlab import server

    return server.serve(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                        artifacts_destination=args.artifacts_destination, auth=args.auth,
                        auth_db_uri=args.auth_db_uri or None, workers=args.workers or None,
                        allowed_hosts=args.allowed_hosts or None)


def cmd_ui(args) -> int:
    import os
    import shutil

    from digitlab import store

    uri = store.configure()
    if uri.startswith(("http://", "https://")):
        print(f"the tracking server at {uri} serves the UI itself: "
              f"{uri.rstrip('/')}/#/experiments/{store.experiment_id()}/runs")
        return 0
    url = store.ui_url(args.host, args.port, store.experiment_id())
    print(f"MLflow UI for {uri}, experiment {store.experiment_name()!r}:\n  {url}", flush=True)
    mlflow_cli = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    os.execv(mlflow_cli, [mlflow_cli, "ui", "--backend-store-uri", uri, "--host", args.host,
                          "--port", str(args.port)])


COMMANDS = {"data": cmd_data, "train": cmd_train, "compare": cmd_compare, "search": cmd_search,
            "promote": cmd_promote, "submit": cmd_submit, "server": cmd_server, "ui": cmd_ui,
            "score": cmd_score}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(True if getattr(args, "verbose", False) else None)  # None: DIGITLAB_VERBOSE
    try:
        return COMMANDS[args.command](args)
    except TrainingFailed as exc:  # a FAILED run exists: not bad input
        print(f"digitlab: training failed: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"digitlab: error: {exc}", file=sys.stderr)
        return 2
    except SearchFailed as exc:
        print(f"digitlab: search stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("digitlab: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("digitlab: terminated", file=sys.stderr)
        return 143
