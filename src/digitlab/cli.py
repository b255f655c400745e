"""The `digitlab` command: parse, check the input, call the library, print the outcome.

Input (data directory, experiment, overrides, search file, policy) is checked
before TensorFlow is imported, so a mistake is reported in a second, on one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from digitlab import console
from digitlab.errors import SearchFailed, Terminated, TrainingFailed, UserError

DESCRIPTION = (
    "Train, search, promote and submit Keras CNNs for Kaggle's Digit Recognizer (MNIST), "
    "every run tracked in MLflow."
)
EPILOG = ("experiments/, search/ and registry/ are read from the working directory when "
          "present, else the copies shipped with digitlab; results are written to the working "
          "directory (mlflow.db, mlruns/, optuna.journal, submissions/).")


def _keras_verbosity() -> int:
    """Keras's progress bar on a terminal, a line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _experiment_config(name: str, args):
    """The experiment with --set overrides, then --epochs/--seed: each value checked."""
    from digitlab import config

    overrides = dict(config.parse_override(p) for p in args.set or [])
    cfg = config.load_experiment(name, overrides)
    options = {}
    if args.epochs:  # 0 keeps the experiment's own (the MLproject default)
        options["training.epochs"] = args.epochs
    if args.seed is not None:
        options["seed"] = args.seed
    return config.apply_overrides(cfg, options) if options else cfg


def _browse(uri: str) -> str:
    return f"browse it with: mlflow ui --backend-store-uri {uri}"


def cmd_data(args) -> int:
    from digitlab import data

    directory = Path(args.data_dir)
    if not directory.exists():
        data.write_embedded(directory)
        print(f"wrote the embedded MNIST subset to {directory}/ in Kaggle layout")
    print(data.describe(data.load(directory)))
    return 0


def cmd_train(args) -> int:
    from digitlab import data

    cfg = _experiment_config(args.experiment, args)
    dataset = data.load(args.data_dir)
    data.check_split(dataset, cfg.training.validation_fraction)
    console.import_backend()
    from digitlab import store, tracked

    uri = store.configure()
    run_id, result, _ = tracked.tracked_run(cfg, dataset, verbose=_keras_verbosity())
    line = f"{cfg.name}: best val_accuracy {result.best_val_accuracy:.4f}"
    if result.holdout_accuracy is not None:
        line += f", holdout_accuracy {result.holdout_accuracy:.4f}"
    print(f"{line}\nMLflow run {run_id} in {uri}\n{_browse(uri)}")
    return 0


def cmd_compare(args) -> int:
    from digitlab import config, data

    names = [n for n in args.experiments.replace(",", " ").split() if n]
    if names == ["all"]:
        names = config.available_experiments()
    configs = [_experiment_config(n, args) for n in names]
    dataset = data.load(args.data_dir)
    for cfg in configs:
        data.check_split(dataset, cfg.training.validation_fraction)
    console.import_backend()
    from digitlab import compare, store

    uri = store.configure()
    table = compare.compare(configs, dataset, verbose=_keras_verbosity())
    print()
    print(table.drop(columns=["run_id"]).to_string(index=False, float_format="{:.4f}".format))
    print(f"\ncomparison logged to {uri}")
    return 0


def cmd_search(args) -> int:
    from digitlab import config, data, search

    settings = search.make_settings(
        args.space, engine=args.engine, trials=args.trials, max_epochs=args.max_epochs,
        minutes=args.minutes, workers=args.workers, storage=args.storage or None,
        study=args.study or None, data_dir=args.data_dir, seed=args.seed,
    )
    dataset = data.load(settings.data_dir)
    for name in settings.space.experiments:
        fraction = config.load_experiment(name, settings.space.fixed).training.validation_fraction
        data.check_split(dataset, fraction)
    console.import_backend()
    summary = search.run(settings, dataset)
    if summary.get("already_finished"):
        return 0
    best = summary["best"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    print(f"study {summary['study']}: {states}")
    if summary["out_of_time"]:
        # Said here because `promote --ensemble K` needs K completed trials, and on a slow
        # machine the budget may complete fewer: running the search again adds more.
        completed = summary["states"].get("COMPLETE", 0)
        print(f"time budget of {settings.space.minutes:g} minutes used up before all "
              f"{settings.trials} trials, {completed} completed (an ensemble of K needs K); "
              "the same command goes on with the study")
    if best:
        print(f"best trial {best['number']}: {settings.space.metric} {best['value']:.4f} "
              f"(MLflow run {best['run_id']})")
    print(f"parent MLflow run {summary['parent_run_id']}; next: digitlab promote")
    return 0


def cmd_promote(args) -> int:
    from digitlab import data, registry

    if args.min_delta is not None and not math.isfinite(args.min_delta):
        raise UserError("--min-delta must be a finite number")
    policy = registry.policy()
    data.load(args.data_dir)
    console.import_backend()
    from digitlab import store

    store.configure()
    if args.rollback:
        print(registry.rollback(policy, data_dir=args.data_dir))
        return 0
    moved, message, version = registry.promote(
        search_run_id=args.search_run or None, run_id=args.run or None, ensemble=args.ensemble,
        tta=args.tta, min_delta=args.min_delta, force=args.force, data_dir=args.data_dir,
    )
    tags = version.tags
    print(f"registered {version.name} version {version.version}: val_accuracy {tags.get('val_accuracy')}"
          + (f", holdout_accuracy {tags['holdout_accuracy']}" if "holdout_accuracy" in tags else ""))
    print(message)
    return 0


def cmd_submit(args) -> int:
    from digitlab import data, registry

    registry.policy()
    data.load(args.data_dir)
    console.import_backend()
    from digitlab import store, submission

    store.configure()
    result = submission.submit(model_uri=args.model_uri or None, data_dir=args.data_dir,
                               output=args.output or None, kaggle_submit=args.kaggle_submit)
    print(f"wrote {result['path']}: {result['rows']} rows from {result['model_uri']}"
          + (f" (version {result['version']})" if result["version"] else ""))
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's -v must not reset a -v given before the subcommand.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show library logs (TensorFlow, MLflow, Optuna) and per-epoch lines")
    parser = argparse.ArgumentParser(prog="digitlab", description=DESCRIPTION, epilog=EPILOG,
                                     parents=[common], formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, description: str | None = None):
        p = sub.add_parser(name, help=help, description=description or help, parents=[common],
                           formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    def data_dir(p):
        p.add_argument("--data-dir", default="data/digit-recognizer",
                       help="Kaggle-layout (train.csv, test.csv, optional solution.csv) or MNIST "
                            "IDX directory; the default is created from the embedded MNIST subset")

    def training_options(p):
        p.add_argument("--epochs", type=int, default=0, help="epochs to train (0: the experiment's own)")
        p.add_argument("--seed", type=int, help="seed (default: the experiment's)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.dropout=0.3 (repeatable)")
        data_dir(p)

    p = command("data", "write the embedded MNIST subset in Kaggle layout, or check a data directory",
                cmd_data)
    data_dir(p)

    p = command("train", "train one experiment, tracked as an MLflow run", cmd_train)
    p.add_argument("--experiment", default="kaggle_cnn",
                   help="experiment name (experiments/NAME.yaml) or path to a YAML file")
    training_options(p)

    p = command("compare", "train several experiments under one parent run and chart them",
                cmd_compare)
    p.add_argument("--experiments", default="all",
                   help="comma-separated experiment names, or 'all' for every experiment found")
    training_options(p)

    p = command("search", "run (or resume) a hyperparameter search; every trial is an MLflow run",
                cmd_search)
    p.add_argument("--space", default="search/default.yaml",
                   help="search file: a name (quick) or a path")
    p.add_argument("--engine", default="optuna", help="optuna or kerastuner")
    p.add_argument("--trials", type=int, default=0, help="trial budget in total (0: the file's)")
    p.add_argument("--max-epochs", type=int, default=0, help="epochs per trial at most (0: the file's)")
    p.add_argument("--minutes", type=float, default=0,
                   help="start no trial after this many minutes (0: the file's budget.minutes, if any)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine")
    p.add_argument("--storage", default="",
                   help="Optuna: a journal file (empty: optuna.journal) or an RDB URL; "
                        "KerasTuner: a directory (empty: kerastuner/)")
    p.add_argument("--study", default="", help="study name (empty: <search file>-<engine>); "
                                                "the same name resumes the study")
    p.add_argument("--seed", type=int, default=42, help="study seed: samplers and the validation split")
    data_dir(p)

    p = command("promote", "register the best model of a search and move the production alias",
                cmd_promote)
    p.add_argument("--search-run", default="", help="search parent run id (empty: the latest search)")
    p.add_argument("--run", default="", help="promote this training or trial run instead")
    p.add_argument("--ensemble", type=int, default=1, help="average the top K trials of the search")
    p.add_argument("--tta", action="store_true", help="average predictions over one-pixel shifts")
    p.add_argument("--min-delta", type=float, default=None,
                   help="required improvement over production (default: registry/policy.yaml)")
    p.add_argument("--force", action="store_true", help="move the aliases even if the gate says no")
    p.add_argument("--rollback", action="store_true", help="swap production and previous back")
    data_dir(p)

    p = command("submit", "write a Kaggle submission CSV from the production model", cmd_submit)
    p.add_argument("--model-uri", default="",
                   help="model to predict with (empty: models:/digit-recognizer@production)")
    p.add_argument("--output", default="", help="CSV to write (empty: registry/policy.yaml's, "
                                                "submissions/submission.csv)")
    p.add_argument("--kaggle-submit", action="store_true", help="upload with the kaggle command")
    data_dir(p)

    p = command("server", "start a shared MLflow tracking server (PostgreSQL or SQLite backend)",
                cmd_server)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback requires authentication")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db",
                   help="e.g. postgresql://user@db-host/mlflow")
    p.add_argument("--artifacts-destination", default="mlartifacts",
                   help="where the server stores artifacts: a shared directory or s3://bucket/path")
    p.add_argument("--auth", action="store_true", help="basic auth even on loopback")
    p.add_argument("--auth-db-uri", default="", help="user database (empty: SQLite beside the server)")
    p.add_argument("--workers", type=int, default=0, help="server worker processes (0: MLflow's)")
    p.add_argument("--allowed-hosts", default="", help="host names clients use to reach the server")

    p = command("ui", "start the MLflow UI on this folder's store and print the experiment's URL",
                cmd_ui)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = command("score", "score a submission against a solution file, as Kaggle does", cmd_score)
    p.add_argument("submission", help="ImageId,Label CSV")
    p.add_argument("solution", help="ImageId,Label CSV with the true labels")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(True if getattr(args, "verbose", False) else None)  # None: DIGITLAB_VERBOSE
    try:
        return args.func(args)
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
