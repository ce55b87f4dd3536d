"""The one way kode changes Keras' global dtype policy: for a block, and back after it.

A run (``kode.train``, ``kode.tune``, ``kode.finetune``) trains in its ``precision`` and leaves
the process in the policy it found, also when it fails; so do the tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras


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
