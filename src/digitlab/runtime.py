"""The backend environment: quiet start-up, seeds, device, precision.

This is the one module that may speak to a specific backend; models and
training stay on Keras 3 APIs.
"""

from __future__ import annotations

import functools
import logging

import keras

# Building a fresh model per trial makes TensorFlow warn about retracing; that is expected.
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def backend() -> str:
    return keras.backend.backend()


def device_name() -> str:
    """'CPU', or the name of the first GPU that the backend sees."""
    name = backend()
    try:
        if name == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                details = tf.config.experimental.get_device_details(gpus[0])
                return details.get("device_name", "GPU")
        elif name == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            if gpus:
                return gpus[0].device_kind
        elif name == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
    except Exception:  # a broken driver means CPU, not a crash
        return "CPU"
    return "CPU"


def gpu_count() -> int:
    """GPUs on this machine, without starting a backend (worker processes pick theirs)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def seed_everything(seed: int) -> None:
    """Same seed, same CPU: same weights, same batches, same metrics."""
    keras.utils.set_random_seed(seed)
    if backend() == "tensorflow":
        import tensorflow as tf

        # Multi-threaded reductions otherwise differ in the last bits from run to run.
        tf.config.experimental.enable_op_determinism()


@functools.cache  # asked once per training run; the CPU does not change
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX, Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def mixed_policy() -> str:
    """The policy that `training.mixed_precision` asks for on this machine.

    float16 on a GPU; bfloat16 on a CPU with AMX under TensorFlow, whose oneDNN
    kernels run bfloat16 convolutions on AMX tiles (a step of the default search's
    CNN took 2.4 times less than in float32); float32 elsewhere, where half
    precision would only lose accuracy.
    """
    if device_name() != "CPU":
        return "mixed_float16"
    if backend() == "tensorflow" and cpu_has_amx_bf16():
        return "mixed_bfloat16"
    return "float32"


def set_precision(mixed: bool) -> str:
    """Set the global dtype policy; call it after `keras.backend.clear_session`, which resets it."""
    policy = mixed_policy() if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy
