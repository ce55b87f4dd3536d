"""Import TensorFlow once, without its C++ start-up banner, and refuse a Keras that is set to
another backend before any kode module imports Keras.

TensorFlow writes INFO lines (oneDNN, CPU features) to fd 2 while it loads, before absl's
logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` alone cannot silence them; they would
bury kode's one-line error messages. Only INFO is filtered (level 1) and only if the user
has not chosen a level; warnings and errors still print.
"""

import json
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


_FIX = "set the environment variable KERAS_BACKEND=tensorflow"


def _keras_json() -> str:
    """Where Keras reads its settings when ``KERAS_BACKEND`` is not set (its documented
    places: ``$KERAS_HOME/keras.json``, else ``~/.keras/keras.json``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "keras.json")


def _configured_backend() -> tuple[str | None, str]:
    """(the backend Keras is set to, where it is set), read the way Keras reads it, without
    importing Keras (whose import fails when that backend's package is missing)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "by KERAS_BACKEND"
    path = _keras_json()
    try:
        with open(path) as fh:
            backend = json.load(fh).get("backend")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
        backend = None
    return (backend if isinstance(backend, str) else None), f"in {path}"


def check_keras_backend() -> None:
    """Raise :class:`~kode.errors.KodeError` when Keras is set to another backend than
    TensorFlow (``KERAS_BACKEND`` or keras.json): kode's layers, gradients and exports are
    TensorFlow code, which would otherwise fail far from the cause, or Keras' own import
    would fail on a missing jax or torch."""
    from kode.errors import KodeError, one_line

    try:
        import keras
    except Exception as err:  # Keras imports the backend's package (jax, torch) at once
        backend, where = _configured_backend()
        if backend in (None, "tensorflow"):
            raise  # a broken installation, not a choice of backend: Keras' error says more
        raise KodeError(f"kode needs Keras' TensorFlow backend, but Keras is set to "
                        f"'{backend}' ({where}), which cannot be imported here "
                        f"({one_line(err)}); {_FIX}") from None
    backend = keras.config.backend()
    if backend != "tensorflow":
        where = ("by KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") == backend
                 else f"in {_keras_json()}")
        raise KodeError(f"kode needs Keras' TensorFlow backend, but Keras is set to "
                        f"'{backend}' ({where}); {_FIX}")


def _is_the_kode_command() -> bool:
    """Whether this process is the ``kode`` command: its console script, or
    ``python -m kode.cli``."""
    argv = list(getattr(sys, "orig_argv", ()))
    as_module = any(a == "-m" and b == "kode.cli" for a, b in zip(argv, argv[1:], strict=False))
    script = os.path.basename(getattr(sys, "argv", [""])[0] or "")
    return as_module or os.path.splitext(script)[0] in ("kode", "kode-script")


def refuse_another_keras_backend() -> None:
    """:func:`check_keras_backend` for ``import kode``. In the ``kode`` command the error is
    its one line and exit code 2: the command cannot catch it itself, since importing
    ``kode.cli`` runs ``kode/__init__.py`` first."""
    from kode.errors import EXIT_USAGE, KodeError, error_line

    try:
        check_keras_backend()
    except KodeError as err:
        if not _is_the_kode_command():
            raise
        print(error_line(err), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
