"""`digitlab search`: a study over one search file, on Optuna or KerasTuner.

- `space`: the search file (one format for both engines), checked before anything runs;
- `settings`: what one invocation was asked to do (`make_settings`);
- `runner`: the study from start to summary; `workers`: parallel worker processes;
- `trial`: one trial, whatever the engine; `optuna_engine`, `kerastuner_engine`: adapters;
- `report`: the search's parent MLflow run.

This package imports nothing heavy, so that a bad search file is rejected before
TensorFlow loads.
"""

from __future__ import annotations

from digitlab.search.settings import Settings, for_data, make_settings

__all__ = ["Settings", "for_data", "make_settings", "run_study"]


def run_study(settings: Settings, dataset=None) -> dict:
    """Run (or resume) the study to its budget; see `runner.run_study`."""
    from digitlab.search import runner

    return runner.run_study(settings, dataset)
