"""The process-wide settings a test, or a kode run, may change: read them and put them back.

Keras' dtype policy, ``keras.config``'s settings and TensorFlow's op determinism and
TensorFloat-32 switch are global to the process (the policy per thread): one test that
leaves ``mixed_float16`` behind makes a later test on the same pytest worker build a
float16 ResNet-50, which overflows at initialization. :func:`global_settings` is what the
tests' autouse check (:mod:`kode.testing.pytest_plugin`) compares before and after each test;
:func:`kode.scopes.precision_scope` changes the policy for a block only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from kode import compat

#: name → (read it, set it back to a value read before).
_SETTINGS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "dtype policy": (lambda: keras.config.dtype_policy().name, keras.config.set_dtype_policy),
    "floatx": (keras.config.floatx, keras.config.set_floatx),
    "epsilon": (keras.config.epsilon, keras.config.set_epsilon),
    "image data format": (keras.config.image_data_format, keras.config.set_image_data_format),
    "max epochs": (keras.config.max_epochs, keras.config.set_max_epochs),
    "max steps per epoch": (keras.config.max_steps_per_epoch,
                            keras.config.set_max_steps_per_epoch),
    "traceback filtering": (keras.config.is_traceback_filtering_enabled, lambda on: (
        keras.config.enable_traceback_filtering() if on
        else keras.config.disable_traceback_filtering())),
    "interactive logging": (keras.config.is_interactive_logging_enabled, lambda on: (
        keras.config.enable_interactive_logging() if on
        else keras.config.disable_interactive_logging())),
    "unsafe deserialization": (compat.unsafe_deserialization_enabled, lambda on: (
        keras.config.enable_unsafe_deserialization() if on
        else compat.restore_safe_deserialization())),
    "op determinism": (compat.op_determinism_enabled, lambda on: (
        tf.config.experimental.enable_op_determinism() if on
        else compat.disable_op_determinism())),
    "tensor float 32": (tf.config.experimental.tensor_float_32_execution_enabled,
                        tf.config.experimental.enable_tensor_float_32_execution),
    "functions run eagerly": (tf.config.functions_run_eagerly, tf.config.run_functions_eagerly),
}


def global_settings() -> dict[str, Any]:
    """Every process-wide setting above, by name."""
    return {name: read() for name, (read, _) in _SETTINGS.items()}


def restore_global_settings(settings: dict[str, Any]) -> list[str]:
    """Set back every setting that differs from ``settings`` (from :func:`global_settings`);
    returns ``"name: before -> now"`` for each one that had changed."""
    changed = []
    for name, (read, write) in _SETTINGS.items():
        now = read()
        if now != settings[name]:
            changed.append(f"{name}: {settings[name]!r} -> {now!r}")
            write(settings[name])
    return changed
