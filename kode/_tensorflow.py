"""Import TensorFlow once, without its C++ start-up banner.

TensorFlow writes INFO lines (oneDNN, CPU features) to fd 2 while it loads, before absl's
logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` alone cannot silence them; they would
bury kode's one-line error messages. Only INFO is filtered (level 1) and only if the user
has not chosen a level; warnings and errors still print.
"""

import os
import sys


def import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no usable fd 2 (embedded interpreters): import as is
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
