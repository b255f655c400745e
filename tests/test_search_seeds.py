"""The summary of the default search over several seeds (benchmarks/studies/search_seeds.py),
on hand-made searches: each way of choosing what to submit is scored as promote would build
it."""

import json

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def search_seeds():
    return load_benchmark("studies/search_seeds")


def write_search(out, seed, probabilities):
    """A finished search whose ranked completed trials predict `probabilities`."""
    here = out / f"seed{seed}"
    here.mkdir()
    np.save(here / "holdout_probabilities.npy", np.asarray(probabilities, dtype=np.float16))
    record = {"seed": seed, "minutes": 1.0, "trials_run": 8, "completed": [{}] * len(probabilities)}
    (here / "search.json").write_text(json.dumps(record))


def test_each_way_scores_the_ranked_trials_as_promote_combines_them(tmp_path, search_seeds):
    labels = np.arange(1000) % 10
    wrong = (labels + 1) % 10
    right, confident_wrong = np.eye(10)[labels], np.eye(10)[wrong]
    # On the first 10 images the best-ranked trial is confidently wrong, while trials 2 and 3
    # are right but unsure (0.4 right, 0.3 on the same wrong label): their average is wrong,
    # their vote is right. Trials 4 and 5 miss the 20 images after them.
    unsure = 0.4 * right + 0.3 * confident_wrong + 0.3 / 8 * (1 - right - confident_wrong)
    first = right.copy()
    first[:10] = confident_wrong[:10]
    second, third = right.copy(), right.copy()
    second[:10] = third[:10] = unsure[:10]
    weak = right.copy()
    weak[10:30] = confident_wrong[10:30]
    write_search(tmp_path, 1, [first, second, third, weak, weak])
    write_search(tmp_path, 2, [right, second])  # two completed trials: no top-3 ensemble
    write_search(tmp_path, 3, [weak])  # searched by an earlier call, not asked for now

    s = search_seeds.summary(tmp_path, labels, [1, 2])
    one, two = s["seeds"]
    assert one["completed_holdout"] == [99.0, 100.0, 100.0, 98.0, 98.0]
    assert one["scores"] == {
        "single (promote)": 99.0,
        "top-3 averaged (promote --ensemble 3)": 99.0,  # the confident member outweighs two
        "top-3 majority vote": 100.0,
        # with trials 4 and 5 sure and right on the first 10 images, and three of five sure
        # and right on the next 20, every image comes out right
        "top-5 averaged (promote --ensemble 5)": 100.0,
        "all completed averaged": 100.0,
    }
    assert two["scores"] == {"single (promote)": 100.0, "all completed averaged": 100.0}
    ways = {r["way"]: r for r in s["ways"]}
    # 99.0% meets the single model's target, not an ensemble's 99.2%
    assert (ways["single (promote)"]["seeds"], ways["single (promote)"]["met"]) == (2, 2)
    assert (ways["top-3 averaged (promote --ensemble 3)"]["seeds"],
            ways["top-3 averaged (promote --ensemble 3)"]["met"]) == (1, 0)
    assert (ways["top-3 majority vote"]["seeds"], ways["top-3 majority vote"]["met"]) == (1, 1)
    assert ways["single (promote)"]["mean"] == pytest.approx(99.5)
