"""A residual function made of an ordered list of one-input Keras layers (the branch of a
ported model's residual block, :mod:`kode.tools.port`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from kode.layers.tracking import TrackedChildren

_PACKAGE = "kode"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerChain(TrackedChildren, layers.Layer):  # its list of layers: tf.train.Checkpoint
    """f(x) = L_k(…L_2(L_1(x))): a ported block's residual branch, its layers in order."""

    def __init__(self, chain: Sequence[layers.Layer], **kwargs):
        super().__init__(**kwargs)
        self.chain = list(chain)
        if not self.chain:
            raise ValueError("a LayerChain needs at least one layer")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.chain:
            if not layer.built:
                layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))

    def call(self, x, training=None):
        for layer in self.chain:
            x = layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.chain:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def get_config(self):
        return {**super().get_config(),
                "chain": [keras.saving.serialize_keras_object(lay) for lay in self.chain]}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["chain"] = [keras.saving.deserialize_keras_object(c) for c in config["chain"]]
        return cls(**config)
