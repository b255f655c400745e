"""What a user sees in the terminal: our lines and one progress bar, library noise only
with `--verbose`.

Library code logs to the `digitlab` logger; its records are written through
`tqdm.write`, so they appear above a progress bar instead of breaking it.
TensorFlow's C++ start-up lines are written before its logging is set up and
ignore TF_CPP_MIN_LOG_LEVEL, so the first backend import runs with the process's
standard error pointed at /dev/null (`import_backend`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

VERBOSE_ENV = "DIGITLAB_VERBOSE"  # inherited by worker processes


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup(is_verbose: bool | None = None) -> None:
    """Configure logging, warnings and the backends' own logs; call before importing them."""
    if is_verbose is None:
        is_verbose = verbose()
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    log = logging.getLogger("digitlab")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if is_verbose else logging.INFO)
    if is_verbose:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["MLFLOW_LOGGING_LEVEL"] = "ERROR"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # "Downloading artifacts" bars
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    warnings.filterwarnings("ignore")  # the libraries' deprecation and user warnings
    # MLflow turns some of its UserWarnings back on inside its own functions (a "once"
    # filter that comes before ours), so they are also dropped where warnings are shown.
    warnings.showwarning = _hide_warning
    for name in ("mlflow", "alembic", "optuna", "absl", "tensorflow", "keras_tuner", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _hide_warning(*args, **kwargs) -> None:
    """`warnings.showwarning` when not verbose: nothing reaches the terminal."""


@contextlib.contextmanager
def library_lines_hidden():
    """What a library prints past its log level (MLflow's "Successfully registered model
    ..." and "Created version ..." lines) is dropped, unless verbose. MLflow's own switch
    for them (`disable_logging`) is turned back on by its other functions."""
    if verbose():
        yield
        return
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_backend() -> None:
    """Import Keras (and its backend) once, quietly unless verbose; later imports are free."""
    if "keras" in sys.modules:
        return
    if verbose():
        import keras  # noqa: F401
        return
    with _stderr_silenced():
        import keras  # noqa: F401
    # Loggers the backends created on import: set again now that they exist.
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


def duration(seconds: float) -> str:
    """A time as a plan line says it: seconds below a minute and a half, else minutes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def number(value) -> str:
    """A float as a person reads it (4 significant digits); anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def values(mapping: dict) -> str:
    """`key=value, ...` with rounded numbers, for one-line trial summaries."""
    return ", ".join(f"{k}={number(v)}" for k, v in mapping.items())
