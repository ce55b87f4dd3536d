"""Make every variable of a kode layer a node of TensorFlow's object graph.

Keras 3 wraps a list or dict assigned to a layer attribute in its own ``TrackedList``/
``TrackedDict``, which TensorFlow's object graph does not see, and a
``keras.random.SeedGenerator`` is not a TensorFlow ``Trackable`` at all. So
``tf.train.Checkpoint`` (and ``tf.train.CheckpointManager``) silently skips layers held in a
list (a stage's residual functions), variables held in a list (LM's k_n) and seed-generator
states, and restoring leaves them at their initial values without an error.

:class:`TrackedChildren` adds them as extra checkpoint children. It defines no attribute, so
Keras' own ``.keras`` format (which walks attributes) is unchanged and old files keep loading.
"""

from __future__ import annotations

import keras

from kode.compat import tensorflow_trackable

_Trackable = tensorflow_trackable()


def _as_trackable(item):
    """The object TensorFlow should checkpoint for ``item`` (None: nothing to save)."""
    if isinstance(item, keras.random.SeedGenerator):
        return item.state
    return item if isinstance(item, _Trackable) else None


def untracked_children(layer: keras.layers.Layer) -> dict[str, _Trackable]:
    """Checkpoint children of ``layer`` that TensorFlow's own tracking misses: the items of its
    public list/tuple/dict attributes (``name_i`` / ``name_key``) and seed-generator states
    (``name_state``)."""
    children = {}
    for name, value in vars(layer).items():
        if name.startswith("_"):
            continue  # Keras' internal bookkeeping; its objects are reachable by their names
        if isinstance(value, keras.random.SeedGenerator):
            children[f"{name}_state"] = value.state
        elif isinstance(value, (list, tuple)):
            items = {f"{name}_{i}": _as_trackable(v) for i, v in enumerate(value)}
            children.update({k: v for k, v in items.items() if v is not None})
        elif isinstance(value, dict):
            items = {f"{name}_{k}": _as_trackable(v) for k, v in value.items()}
            children.update({k: v for k, v in items.items() if v is not None})
    return children


class TrackedChildren:
    """Mixin for Keras layers (put it before the Keras base class): layers, variables and seed
    generators held in public list/dict attributes, and seed generators, are saved and restored
    by ``tf.train.Checkpoint``.

    ``class MyBlock(TrackedChildren, keras.layers.Layer): ...``
    """

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            for name, child in untracked_children(self).items():
                children.setdefault(name, child)
        return children
