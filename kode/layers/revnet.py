"""RevNet's coupling layers (Gomez et al. 2017): the authors' downsampling unit, where the
shape changes, as pieces of a :class:`~kode.layers.stage.TransitionBlock`.

The state is split into channel halves (X, Y). The downsampling unit computes
X' = P(X) + F(Y), Y' = P(Y) + G(X'), with P an average pool (stride) padded with zero
channels; it is not invertible and backpropagates.
"""

from __future__ import annotations

import keras
from keras import layers, ops

_PACKAGE = "kode"


def _pool_pad(x, out_channels: int, stride: int):
    if stride > 1:
        x = ops.average_pool(x, stride, stride, padding="same")
    return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, out_channels - x.shape[-1]]])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HalvesPoolPad(layers.Layer):
    """P(x) = [pool_pad(X), pool_pad(Y)]: each half average-pooled with ``stride`` and padded
    with zero channels to ``filters / 2`` (no parameters; the authors' shortcut)."""

    def __init__(self, filters: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride = int(filters), int(stride)

    def call(self, x):
        x1, x2 = ops.split(x, 2, axis=-1)
        half = self.filters // 2
        return ops.concatenate([_pool_pad(x1, half, self.stride),
                                _pool_pad(x2, half, self.stride)], axis=-1)

    def compute_output_shape(self, input_shape):
        spatial = [None if d is None else -(-d // self.stride) for d in input_shape[1:3]]
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RevNetDownsampleFunction(layers.Layer):
    """The residual part of the downsampling unit, so that P(x) + r(x) = [X', Y']:
    r(x) = [F(Y), G(P(X) + F(Y))], F with the stride, G on the new shape."""

    def __init__(self, f: layers.Layer, g: layers.Layer, filters: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.f, self.g = f, g
        self.filters, self.stride = int(filters), int(stride)

    def build(self, input_shape):
        half_in = (*input_shape[:-1], input_shape[-1] // 2)
        if not self.f.built:
            self.f.build(half_in)
        if not self.g.built:
            self.g.build(self.f.compute_output_shape(half_in))

    def call(self, x, training=None):
        x1, x2 = ops.split(x, 2, axis=-1)
        fy = self.f(x2, training=training)
        return ops.concatenate(
            [fy, self.g(_pool_pad(x1, self.filters // 2, self.stride) + fy, training=training)],
            axis=-1)

    def compute_output_shape(self, input_shape):
        half = self.f.compute_output_shape((*input_shape[:-1], input_shape[-1] // 2))
        return (*half[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "f": keras.saving.serialize_keras_object(self.f),
                "g": keras.saving.serialize_keras_object(self.g), "filters": self.filters,
                "stride": self.stride}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("f", "g"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
