"""digitlab: experiment tracking and hyperparameter search for handwritten digits."""

import os

# Quiet TensorFlow's C++ start-up logs; must happen before keras imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A GPU is shared: without these, the first process to start takes (nearly) all of its
# memory, and the other workers of `--workers N` on the same GPU cannot start a trial.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

__version__ = "0.1.0"
