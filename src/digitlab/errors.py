"""Errors that are the user's to fix: the CLI prints them on one line and exits 2."""


class UserError(Exception):
    """Bad input (a file, a config, an option). The message names what and where."""


class DataError(UserError):
    """A data file is malformed; the message names the file, line and column."""


class ConfigError(UserError):
    """An experiment file or an override is invalid."""


class TrainingFailed(UserError):
    """Training ran to its end but diverged or learnt nothing (`train.Result.failure`); its
    run ended FAILED. `reason` is the short tag (`diverged`, `no better than chance`)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that an MLflow run ends KILLED, not RUNNING."""


class SearchFailed(Exception):
    """The search itself stopped (e.g. several trials failed in a row); exit status 1."""


def one_line(text: object, limit: int = 300) -> str:
    """The first line of an error, short enough for the CLI's one-line message."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."
