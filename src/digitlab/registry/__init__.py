"""The model registry: select the best trial(s) of a search, package and evaluate them
through the serving path, register a version, load-check it, gate it, move the aliases.

- `selection`: which runs (the top trials by `search.ranking`, a search's final models, or
  one named run);
- `members`: what a registered model is made of (each member's Keras models, weights);
- `evaluation`: a serving model scored on held-out images by the path `digitlab submit`
  uses, and the load check;
- `packaging`: registration: the pyfunc model logged, the version, its tags and description;
- `promotion`: the promote flow (select, refit, register, load check, gate);
- `aliases`: the gate, `production` / `previous`, rollback;
- `promotion_policy`: `registry/policy.yaml` (model name, gate, aliases, inference
  batch), typed.
"""

from __future__ import annotations

from digitlab.registry import promotion_policy
from digitlab.registry.aliases import comparable, rollback
from digitlab.registry.evaluation import predict_labels, to_rows
from digitlab.registry.members import keras_file
from digitlab.registry.packaging import register
from digitlab.registry.promotion import promote
from digitlab.registry.promotion_policy import Policy
from digitlab.search.ranking import latest_search_run, ranked_trials


def policy() -> Policy:
    """registry/policy.yaml of the working directory, else the shipped one (typed)."""
    return promotion_policy.load()


__all__ = ["Policy", "comparable", "keras_file", "latest_search_run", "policy", "predict_labels",
           "promote", "ranked_trials", "register", "rollback", "to_rows"]
