"""On a machine with a GPU: training runs there, and mixed precision means float16.

Skipped where the backend sees no GPU (CI has none); run with `pytest -m gpu`, under
`KERAS_BACKEND=jax` where TensorFlow is not installed.
"""

import pytest

from digitlab import config, data, runtime, store, training_run

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu():
    name = runtime.device_name()
    if name == "CPU":
        pytest.skip(f"no GPU visible to the {runtime.backend()} backend")
    return name


def test_a_run_trains_on_the_gpu_in_float16(workdir, tiny_dir, gpu):
    import mlflow

    store.configure()
    cfg = config.load_experiment("basic_cnn", {"training.epochs": 1, "training.mixed_precision": True})
    run_id, result, _ = training_run.tracked_run(cfg, data.load(tiny_dir), verbose=0)
    run = mlflow.get_run(run_id)
    assert run.data.tags["device"] == gpu
    assert result.precision == "mixed_float16"
    assert run.info.status == "FINISHED"
