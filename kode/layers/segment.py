"""The layers outside the integrator stages (stem, shape-changing blocks, head), recomputed in
the backward pass when the stages save memory.

Under ``gradient="adjoint"`` a stage keeps only its input and output; every other layer would
still keep its activations for backpropagation, and at the network's largest maps (the stem's
112×112, the first shape-changing blocks) they become most of the memory left. A
:class:`Recomputable` layer in a memory-saving mode keeps only its input and rebuilds its
activations in the backward (:func:`kode.gradients.recompute`): its input is the previous
stage's output, which that stage keeps anyway, so the saving costs one extra forward of the
layer and no memory.
"""

from __future__ import annotations

import keras
from keras import layers

from kode.gradients import BACKPROP, check_mode, recompute
from kode.layers.tracking import TrackedChildren

_PACKAGE = "kode"


def random_state_variables(layer: keras.layers.Layer) -> list:
    """The non-trainable integer variables of ``layer``: its random generators' states, which a
    recomputation replays so that dropout and stochastic depth draw the same as the forward."""
    return [v for v in layer.non_trainable_variables if "int" in str(v.dtype)]


class Recomputable:
    """Mixin for a layer outside the stages: its ``gradient`` attribute (a gradient mode, set
    with :func:`check_mode`; takes effect at the next traced train step) other than
    "backprop" makes :meth:`recomputed` keep only the input and recompute the activations in
    the backward."""

    gradient: str = BACKPROP

    def recomputed(self, fn, x, training=None):
        """``fn(x)``; in training with a memory-saving mode, recomputed in the backward."""
        if training and self.gradient != BACKPROP:
            return recompute(fn, x, random_state_variables(self))
        return fn(x)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecomputedSegment(Recomputable, TrackedChildren, layers.Layer):
    """A one-input piece of a network outside its stages (a ported model's stem, the
    shape-changing blocks between two stages, the head) as one layer: ``body`` is a functional
    model of those layers; ``gradient`` other than "backprop" recomputes it in the backward.

    The segment does not cast its input (``autocast=False``): each layer of the body applies
    its own dtype policy, exactly as in the network the segment was cut from.
    """

    def __init__(self, body: keras.Model, gradient: str = BACKPROP, **kwargs):
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        if len(body.inputs) != 1:
            raise ValueError(f"a segment has one input; '{body.name}' has {len(body.inputs)}")
        self.body = body
        self.gradient = check_mode(gradient)

    def build(self, input_shape):
        pass  # the body is a built functional model

    def call(self, x, training=None):
        def run(t):
            y = self.body(t, training=training)
            return tuple(y) if isinstance(y, list) else y

        return self.recomputed(run, x, training)

    def compute_output_spec(self, x, training=None):
        y = self.body.compute_output_spec(x)
        return tuple(y) if isinstance(y, list) else y

    def get_config(self):
        config = {**super().get_config(), "body": keras.saving.serialize_keras_object(self.body),
                  "gradient": self.gradient}
        config.pop("autocast", None)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["body"] = keras.saving.deserialize_keras_object(config["body"])
        return cls(**config)
