"""The process-wide settings a run changes for its duration only: Keras' global dtype policy
and TensorFlow's op determinism.

``kode.train``, ``kode.tune`` and ``kode.finetune`` train in their ``precision`` (and, asked
to, deterministically) and leave the process as they found it, also when they fail; the tests
and benchmarks change the policy through :func:`precision_scope` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from kode import compat


@contextlib.contextmanager
def precision_scope(policy: str | keras.DTypePolicy) -> Iterator[None]:
    """Keras' global dtype policy is ``policy`` (e.g. ``"mixed_bfloat16"``) inside the block
    and what it was before after it, whether the block returns or raises."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """TensorFlow's op determinism on inside the block when ``enabled`` (bitwise reproducible
    kernels), as it was after it; ``enabled=False`` leaves it as it is."""
    was_on = compat.op_determinism_enabled()
    if enabled:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was_on:
            compat.disable_op_determinism()
