"""RevNet (Gomez et al. 2017; Lu et al.'s reading, forward Euler on a coupled system): the
state is split into channel halves (X, Y); X_{n+1} = X_n + h F_n(Y_n),
Y_{n+1} = Y_n + h G_n(X_{n+1}); exactly reversible, so ``gradient="adjoint"`` is exact.

Layouts are the authors' CIFAR configurations: depth counts convolutions, 12n+2 with basic and
18n+2 with bottleneck residual functions (n units per stage, each unit one F and one G on half
the channels), stem 32 channels, stage widths 32/64/112 for RevNet-38 and 32/64/128 otherwise
(×4 with bottlenecks). A stage's first unit, where the shape changes, is the authors'
downsampling unit X' = P(X) + F(Y), Y' = P(Y) + G(X') with P an average pool (stride) and
zero channels; it is not invertible and backpropagates.
"""

from __future__ import annotations

import inspect

import keras
from keras import layers, ops

from kode.errors import KodeError
from kode.stage import TransitionBlock
from zoo.builder import Layout, family_builder
from zoo.registry import register_model

_PACKAGE = "kode"
RECIPE_DEPTHS = {38: False, 110: False, 164: True}  # name → bottleneck (authors' configs)


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


def revnet_transition(in_channels, out_channels, stride, make_function, name):
    """The authors' downsampling unit as a :class:`TransitionBlock`: P + r = [X', Y']."""
    half = out_channels // 2
    residual = RevNetDownsampleFunction(make_function(half, stride, f"{name}_F"),
                                        make_function(half, 1, f"{name}_G"),
                                        out_channels, stride, name=f"{name}_f")
    return TransitionBlock(residual, HalvesPoolPad(out_channels, stride, name=f"{name}_p"),
                           name=name)


def revnet_layout(depth: int, bottleneck: bool | None = None) -> Layout:
    """The authors' CIFAR layout for ``depth`` (12n+2 basic, 18n+2 bottleneck)."""
    bottleneck = bool(bottleneck)
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise KodeError(f"depth must be an integer, got {depth!r}")
    per_unit, form = (18, "18n+2 (bottleneck), e.g. 164") if bottleneck else (
        12, "12n+2 (basic), e.g. 38, 110")
    n, rest = divmod(depth - 2, per_unit)
    if rest or n < 1:
        raise KodeError(f"depth {depth} is not a RevNet CIFAR depth of the form {form}")
    widths = (32, 64, 112) if depth == 38 and not bottleneck else (32, 64, 128)
    return Layout((n, n, n), widths, (1, 2, 2), bottleneck, "cifar", stem_width=32,
                  transition=revnet_transition)


_build = family_builder("revnet", "revnet", __doc__)


def revnet(depth: int = 38, **kwargs) -> keras.Model:
    layout = kwargs.pop("layout", "cifar")
    if layout != "cifar":
        raise KodeError(f"revnet has the authors' CIFAR layouts only, got layout '{layout}'")
    return _build(depth, layout=revnet_layout(depth, kwargs.get("bottleneck")), **kwargs)


_signature = inspect.signature(_build)
_depth, *_rest = _signature.parameters.values()
revnet.__signature__ = _signature.replace(parameters=[_depth.replace(default=38), *_rest])
revnet.__doc__ = _build.__doc__
revnet.integrator = _build.integrator

for _depth_value, _bottleneck in RECIPE_DEPTHS.items():
    register_model(f"revnet{_depth_value}", "revnet", revnet, depth=_depth_value, layout="cifar",
                   bottleneck=_bottleneck, classes=10)
