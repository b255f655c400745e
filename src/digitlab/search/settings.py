"""What one `digitlab search` invocation was asked to do."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from digitlab.errors import UserError
from digitlab.search import search_file
from digitlab.search.search_file import StudyFile
from digitlab.validation import Validation

ENGINES = ("optuna", "kerastuner")


@dataclass(frozen=True)
class Settings:
    study_file: StudyFile  # the search file, with any --trials / --max-epochs already applied to its budget
    engine: str
    study: str
    storage: str | None
    workers: int
    data_dir: str | None
    seed: int
    data_digest: str = ""  # the data the study is on: part of its identity (`for_data`)
    space: str = ""  # --space as the user typed it (a name or a relative path): the reproduce command's
    # time.time() after which no trial starts: the end of the trials' time less one full
    # trial (the budget's plan), set when the search starts
    deadline: float | None = None

    def out_of_time(self) -> bool:
        """Whether a trial started now could not end within the trials' time."""
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def trials(self) -> int:
        return self.study_file.budget.trials

    @property
    def max_epochs(self) -> int:
        return self.study_file.budget.max_epochs

    @property
    def validation(self) -> Validation:
        """How trials are validated: the file's, or --validation's (or --folds')."""
        return self.study_file.validator


def make_settings(space_path: str, engine: str = "optuna", trials: int | None = None,
                  max_epochs: int | None = None, minutes: float | None = None, workers: int = 1, storage: str | None = None,
                  study: str | None = None, data_dir: str | None = None, seed: int = 42,
                  validation: dict | None = None) -> Settings:
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if engine == "kerastuner" and workers > 1:
        raise UserError("the kerastuner engine runs one worker; use --engine optuna for --workers > 1")
    for option, value in (("--trials", trials), ("--max-epochs", max_epochs), ("--minutes", minutes)):
        if value is not None and (value < 0 or value != value or value == float("inf")):
            raise UserError(f"{option} must be a positive number (0: the search file's)")
    # Budget options take the place of the file's values before the file is checked, so
    # they meet the same rules (e.g. optuna.min_epochs <= budget.max_epochs); so does
    # --validation (e.g. an objective that has an out-of-fold value).
    budget = {"trials": trials or None, "max_epochs": max_epochs or None, "minutes": minutes or None}
    study_file: StudyFile = search_file.load(space_path, {k: v for k, v in budget.items() if v},
                                      validation=validation)
    default = f"{study_file.name}-{engine}{study_file.validator.study_suffix()}"
    return Settings(study_file=study_file, engine=engine, study=study or default,
                    storage=storage, workers=workers, data_dir=data_dir, seed=seed,
                    space=str(space_path))


def for_data(settings: Settings, digest: str, named: bool) -> Settings:
    """The settings of a study on the data with `digest`. A default study name on data other
    than the embedded demo's ends in the data's short digest, so the same command on a new
    data set starts a new study instead of resuming (or mixing into) another data set's;
    a `--study` NAME (`named`) is kept, and the engine refuses it on other data."""
    from digitlab.data import EMBEDDED_DIGEST

    study = settings.study
    if not named and digest != EMBEDDED_DIGEST:
        study = f"{study}-{digest[:8]}"
    return dataclasses.replace(settings, study=study, data_digest=digest)


def check_data(settings: Settings, recorded: str | None) -> None:
    """A study resumes only on the data it was made on (`recorded`: the digest the engine
    stored when it created the study; None for a study made before digests were stored)."""
    if recorded and settings.data_digest and recorded != settings.data_digest:
        raise UserError(f"study {settings.study!r} was made on data {recorded[:12]}, but the data "
                        f"directory holds {settings.data_digest[:12]}: use the same --data-dir, or "
                        "another --study name (or none: the default name follows the data)")
