"""`digitlab` command line: parse, call the library, report. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from digitlab.errors import SearchFailed, Terminated, UserError

ALL_EXPERIMENTS = ["dnn", "basic_cnn", "optimized_cnn", "deep_cnn", "lenet5", "kaggle_cnn", "wide_cnn"]


def _overrides(pairs: list[str]) -> dict:
    from digitlab.config import parse_override

    return dict(parse_override(p) for p in pairs)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2  # progress bars on a terminal, a line per epoch in logs


def cmd_data(args) -> int:
    from digitlab import data

    directory = Path(args.data_dir)
    if not directory.exists():
        data.write_embedded(directory)
        print(f"wrote the embedded MNIST subset to {directory}/ in Kaggle layout")
    print(data.describe(data.load(directory)))
    return 0


def _experiment_config(name: str, args):
    from digitlab import config

    overrides = _overrides(args.set or [])
    if args.epochs:  # 0 keeps the experiment's own (the MLproject default)
        overrides["training.epochs"] = args.epochs
    if args.seed is not None:
        overrides["seed"] = args.seed
    return config.load_experiment(name, overrides)


def cmd_train(args) -> int:
    from digitlab import data, tracking

    cfg = _experiment_config(args.experiment, args)  # bad config or data: fail before any run
    dataset = data.load(args.data_dir)
    uri = tracking.configure()
    run_id, result = tracking.train_tracked(cfg, dataset, verbose=_verbose())
    print(f"\n{cfg.name}: best val_accuracy {result.best_val_accuracy:.4f}", end="")
    if result.holdout_accuracy is not None:
        print(f", holdout_accuracy {result.holdout_accuracy:.4f}", end="")
    print(f"\nMLflow run {run_id} in {uri}\nbrowse it with: make ui  (or: mlflow ui --backend-store-uri {uri})")
    return 0


def cmd_compare(args) -> int:
    from digitlab import compare, data, tracking

    names = [n for n in args.experiments.replace(",", " ").split() if n]
    configs = [_experiment_config(n, args) for n in names]
    dataset = data.load(args.data_dir)
    uri = tracking.configure()
    table = compare.compare(configs, dataset, verbose=_verbose())
    print()
    print(table.drop(columns=["run_id"]).to_string(index=False))
    print(f"\ncomparison logged to {uri}")
    return 0


def cmd_search(args) -> int:
    from digitlab import search

    settings = search.make_settings(
        args.space, engine=args.engine, trials=args.trials, max_epochs=args.max_epochs,
        minutes=args.minutes, workers=args.workers, storage=args.storage or None, study=args.study or None,
        data_dir=args.data_dir, seed=args.seed,
    )
    summary = search.run(settings)
    if summary.get("already_finished"):
        return 0
    best = summary["best"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    print(f"\nstudy {summary['study']}: {states}")
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
    print(f"parent MLflow run {summary['parent_run_id']}; browse it with: make ui")
    return 0


def cmd_promote(args) -> int:
    from digitlab import registry, tracking

    tracking.configure()
    if args.rollback:
        print(registry.rollback(registry.policy()))
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
    from digitlab import submission, tracking

    tracking.configure()
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

    server.serve(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                 artifacts_destination=args.artifacts_destination, auth=args.auth,
                 auth_db_uri=args.auth_db_uri or None, workers=args.workers or None,
                 allowed_hosts=args.allowed_hosts or None)
    return 0  # not reached: serve() replaces this process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p):
        p.add_argument("--data-dir", default="data/digit-recognizer",
                       help="Kaggle-layout or MNIST IDX directory (default: the embedded MNIST subset)")

    def training_options(p):
        p.add_argument("--epochs", type=int, help="override training.epochs (0: the experiment's own)")
        p.add_argument("--seed", type=int, help="override the experiment's seed")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.dropout=0.3 (repeatable)")
        data_dir(p)

    p = sub.add_parser("data", help="write the embedded default data, or check a data directory")
    data_dir(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one experiment, tracked in MLflow")
    p.add_argument("--experiment", default="kaggle_cnn",
                   help="experiment name (experiments/NAME.yaml) or path to a YAML file")
    training_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several experiments under one parent run")
    p.add_argument("--experiments", default=",".join(ALL_EXPERIMENTS),
                   help="comma-separated experiment names (default: all seven)")
    training_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("search", help="run (or resume) a hyperparameter search")
    p.add_argument("--space", default="search/default.yaml", help="search-space file")
    p.add_argument("--engine", default="optuna", help="optuna or kerastuner")
    p.add_argument("--trials", type=int, default=0, help="trial budget in total (0: the file's)")
    p.add_argument("--max-epochs", type=int, default=0, help="epochs per trial at most (0: the file's)")
    p.add_argument("--minutes", type=float, default=0,
                   help="start no trial after this many minutes (0: the file's budget.minutes, if any)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine")
    p.add_argument("--storage", default="",
                   help="Optuna storage: a journal file (default optuna.journal) or an RDB URL; "
                        "KerasTuner: a directory (default kerastuner/)")
    p.add_argument("--study", default="", help="study name (default: <space>-<engine>); same name resumes")
    p.add_argument("--seed", type=int, default=42)
    data_dir(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("promote", help="register the best model of a search and move the production alias")
    p.add_argument("--search-run", default="", help="search parent run id (default: the latest search)")
    p.add_argument("--run", default="", help="promote this training or trial run instead")
    p.add_argument("--ensemble", type=int, default=1, help="average the top K trials of the search")
    p.add_argument("--tta", action="store_true", help="average predictions over one-pixel shifts")
    p.add_argument("--min-delta", type=float, default=None,
                   help="required improvement over production (default: registry/policy.yaml)")
    p.add_argument("--force", action="store_true", help="move the aliases even if the gate says no")
    p.add_argument("--rollback", action="store_true", help="swap production and previous back")
    data_dir(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("submit", help="write a Kaggle submission from the production model")
    p.add_argument("--model-uri", default="", help="default: models:/digit-recognizer@production")
    p.add_argument("--output", default="", help="default: submissions/submission.csv")
    p.add_argument("--kaggle-submit", action="store_true", help="upload with the kaggle command")
    data_dir(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("server", help="start a tracking server (PostgreSQL or SQLite backend)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback requires authentication")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db",
                   help="e.g. postgresql://user@db-host/mlflow")
    p.add_argument("--artifacts-destination", default="mlartifacts",
                   help="where the server stores artifacts: a shared directory or s3://bucket/path")
    p.add_argument("--auth", action="store_true", help="basic auth even on loopback")
    p.add_argument("--auth-db-uri", default="", help="user database (default: SQLite beside the server)")
    p.add_argument("--workers", type=int, default=0, help="server worker processes")
    p.add_argument("--allowed-hosts", default="", help="host names clients use to reach the server")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("score", help="score a submission against a solution file, as Kaggle would")
    p.add_argument("submission")
    p.add_argument("solution")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
