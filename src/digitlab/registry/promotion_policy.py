"""The promotion policy: registry/policy.yaml (the working directory's, else the shipped
one) as a typed, frozen dataclass. Unknown keys and wrong types are one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

from digitlab.errors import ConfigError, UserError


@dataclass(frozen=True)
class Policy:
    model_name: str = "digit-recognizer"
    production_alias: str = "production"
    previous_alias: str = "previous"
    min_delta: float = 0.0
    load_check_rows: int = 5
    submission_path: str = "submissions/submission.csv"
    predict_batch_size: int = 4096  # rows per prediction batch (serving, submit)
    # `promote --ensemble auto`: members at most, counted with repetition (greedy selection
    # adds one model per step and may add the same trial again)
    auto_ensemble_max: int = 10


def load() -> Policy:
    """registry/policy.yaml of the working directory, else the shipped one."""
    from digitlab import config, resources, typed

    path = resources.optional("registry", "policy.yaml")
    if path is None:
        return Policy()
    raw = config.read_mapping(path)  # as experiment and search files are read
    try:
        policy = typed.build(Policy, raw, "")
    except ConfigError as exc:  # "min_delta: expected float, ..." / ": unknown key ..."
        raise UserError(f"{path}: {str(exc).removeprefix(': ')}") from None
    for key in ("load_check_rows", "predict_batch_size", "auto_ensemble_max"):
        if getattr(policy, key) < 1:
            raise UserError(f"{path}: {key} must be at least 1 (got {getattr(policy, key)})")
    return policy
