"""The `digitlab` command line's arguments: what each command does and its defaults."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Train, search, promote and submit Keras CNNs for Kaggle's Digit Recognizer (MNIST), "
    "every run tracked in MLflow."
)
EPILOG = ("experiments/, search/ and registry/ are read from the working directory when "
          "present, else the copies shipped with digitlab; results are written to the working "
          "directory (mlflow.db, mlruns/, optuna.journal, submissions/).")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says what its
    default means (`(0: ...)`, `(empty: ...)`, `default`) or there is none to show."""

    def _get_help_string(self, action):
        help = action.help or ""
        if (action.default in (None, False, "", argparse.SUPPRESS) or action.option_strings == []
                or "default" in help or "(0:" in help or "(empty:" in help):
            return help
        return f"{help} (default: %(default)s)" if help else "default: %(default)s"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digitlab")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _boolean(text: str) -> bool:
    """true/false for options that `mlflow run -P name=...` passes a value to."""
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _flag(p, name: str, help: str) -> None:
    """An on/off option: `--name` alone, or `--name true|false` as `mlflow run -P name=...`
    passes it."""
    p.add_argument(name, type=_boolean, nargs="?", const=True, default=False, metavar="BOOL",
                   help=help)


def _ensemble(text: str) -> int | str | None:
    """A positive number of trials, `auto`, or empty for "not given"."""
    if not text.strip():
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of trials or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 trial, got {value}")
    return value


def _optional_float(text: str) -> float | None:
    """A number, or empty for "not given" (an MLproject parameter's empty default)."""
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's -v must not reset a -v given before the subcommand.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show library logs (TensorFlow, MLflow, Optuna) and per-epoch lines")
    parser = argparse.ArgumentParser(prog="digitlab", description=DESCRIPTION, epilog=EPILOG,
                                     parents=[common], formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"digitlab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None):
        p = sub.add_parser(name, help=help, description=description or help, parents=[common],
                           formatter_class=_Formatter)
        return p

    def data_dir(p):
        p.add_argument("--data-dir", default="data/digit-recognizer",
                       help="Kaggle-layout (train.csv, test.csv, optional solution.csv) or MNIST "
                            "IDX directory (default: data/digit-recognizer, created from the "
                            "embedded MNIST subset)")

    def training_options(p):
        p.add_argument("--epochs", type=int, default=0, help="epochs to train (0: the experiment's own)")
        p.add_argument("--seed", type=int, help="seed (default: the experiment's)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.dropout=0.3 (repeatable; "
                            "one value may hold several pairs separated by spaces)")
        data_dir(p)

    p = command("data", "write the embedded MNIST subset in Kaggle layout, or check a data directory")
    data_dir(p)
    _flag(p, "--demo", "write the embedded MNIST subset into --data-dir, a folder that does not "
                       "exist yet (without it only the default folder gets the demo)")

    p = command("train", "train one experiment, tracked as an MLflow run")
    p.add_argument("--experiment", default="kaggle_cnn",
                   help="experiment name (experiments/NAME.yaml) or path to a YAML file")
    training_options(p)

    p = command("compare", "train several experiments under one parent run and chart them")
    p.add_argument("--experiments", default="all",
                   help="comma-separated experiment names, or 'all' for every experiment found")
    training_options(p)

    p = command("search", "run (or resume) a hyperparameter search; every trial is an MLflow run")
    p.add_argument("--space", default="search/default.yaml",
                   help="search file: a name (quick) or a path")
    p.add_argument("--engine", default="optuna", choices=["optuna", "kerastuner"],
                   help="search engine")
    p.add_argument("--trials", type=int, default=0, help="trial budget in total (0: the file's)")
    p.add_argument("--max-epochs", type=int, default=0, help="epochs per trial at most (0: the file's)")
    p.add_argument("--minutes", type=float, default=0,
                   help="the whole job's time, trials and final training together: the plan "
                        "splits it, and nothing starts that cannot end within it (0: the file's "
                        "budget.minutes; if none, budget.search_minutes of trials, then final "
                        "training's planned length)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine")
    p.add_argument("--folds", type=int, default=0,
                   help="K-fold validation: each trial trains K models on stratified folds and "
                        "is scored by their out-of-fold predictions (0: the search file's "
                        "validation, if any; else one validation split); shorthand for "
                        "--validation kfold:folds=K")
    p.add_argument("--validation", default="",
                   help="how trials are validated, as KIND:NAME=VALUE,... in place of the search "
                        "file's validation section: holdout[:fraction=F], kfold:folds=K, "
                        "repeated:repeats=R,fraction=F (empty: the file's)")
    p.add_argument("--storage", default="",
                   help="Optuna: a journal file (empty: optuna.journal) or an RDB URL; "
                        "KerasTuner: a directory (empty: kerastuner/)")
    p.add_argument("--study", default="", help="study name (empty: <search file>-<engine>, plus the "
                                                "data's short digest on data other than the demo); "
                                                "the same name resumes the study, on its own data only")
    p.add_argument("--seed", type=int, default=42, help="study seed: samplers and the validation split")
    data_dir(p)

    p = command("promote", "register the best model of a search and move the production alias")
    p.add_argument("--search-run", default="", help="search parent run id (empty: the latest search)")
    p.add_argument("--run", default="", help="promote this training or trial run instead")
    p.add_argument("--ensemble", type=_ensemble, default=None, metavar="K|auto",
                   help="average the top K trials of the search, or `auto`: the trials (and "
                        "weights) that greedy selection picks from every trial's held-out "
                        "predictions (empty or left out: the search's final models when it "
                        "trained them, else its best trial)")
    _flag(p, "--tta", "average predictions over one-pixel shifts")
    p.add_argument("--min-delta", type=_optional_float, default=None, metavar="X",
                   help="required improvement over production (empty or left out: "
                        "registry/policy.yaml's min_delta)")
    _flag(p, "--force", "move the aliases even if the gate says no")
    _flag(p, "--rollback", "swap production and previous back")
    _flag(p, "--refit", "first train each chosen trial again on every labelled image (training "
                        "and validation), for as many epochs as it trained, as a run nested "
                        "under the trial")
    data_dir(p)

    p = command("submit", "write a Kaggle submission CSV from the production model")
    p.add_argument("--model-uri", default="",
                   help="model to predict with (empty: models:/digit-recognizer@production)")
    p.add_argument("--output", default="", help="CSV to write (empty: registry/policy.yaml's, "
                                                "submissions/submission.csv)")
    _flag(p, "--kaggle-submit", "upload with the kaggle command")
    _flag(p, "--force", "submit even a model trained on other data than --data-dir's train.csv")
    data_dir(p)

    p = command("server", "start a shared MLflow tracking server (PostgreSQL or SQLite backend)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback requires authentication")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db",
                   help="e.g. postgresql://user@db-host/mlflow")
    p.add_argument("--artifacts-destination", default="mlartifacts",
                   help="where the server stores artifacts: a shared directory or s3://bucket/path")
    _flag(p, "--auth", "basic auth even on loopback")
    p.add_argument("--auth-db-uri", default="", help="user database (empty: SQLite beside the server)")
    p.add_argument("--workers", type=int, default=0, help="server worker processes (0: MLflow's)")
    p.add_argument("--allowed-hosts", default="", help="host names clients use to reach the server")

    p = command("ui", "start the MLflow UI on this folder's store and print the experiment's URL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")

    p = command("score", "score a submission against a solution file, as Kaggle does")
    p.add_argument("submission", help="ImageId,Label CSV")
    p.add_argument("solution", help="ImageId,Label CSV with the true labels")
    return parser
