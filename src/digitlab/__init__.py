"""digitlab: experiment tracking and hyperparameter search for handwritten digits."""

import os

# Quiet TensorFlow's C++ start-up logs; must happen before keras imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
