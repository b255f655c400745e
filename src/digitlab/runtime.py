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


# CPU flags (Linux) of the instructions that multiply bfloat16 in hardware: Intel AMX
# tiles, and the AVX-512 BF16 dot products of recent Xeons and of AMD Zen 4.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache  # asked once per training run; the CPU does not change
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX-512 BF16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def mixed_policy() -> str:
    """The policy that `training.mixed_precision` asks for on this machine.

    float16 on a GPU; bfloat16 on a CPU with hardware bfloat16 under TensorFlow,
    whose oneDNN kernels then run the convolutions in bfloat16, several times faster
    than float32 with AMX and faster with AVX-512 BF16 (benchmarks/bench_train.py);
    float32 elsewhere, where half precision would only lose accuracy.
    """
    if device_name() != "CPU":
        return "mixed_float16"
    if backend() == "tensorflow" and cpu_has_bf16():
        return "mixed_bfloat16"
    return "float32"


def set_precision(mixed: bool) -> str:
    """Set the global dtype policy; call it after `keras.backend.clear_session`, which resets it."""
    policy = mixed_policy() if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy
