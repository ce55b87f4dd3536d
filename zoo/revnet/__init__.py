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

from kode.errors import KodeError
from kode.layers.revnet import HalvesPoolPad, RevNetDownsampleFunction
from kode.layers.stage import TransitionBlock
from zoo.builder import Layout, family_builder
from zoo.registry import register_model

RECIPE_DEPTHS = {38: False, 110: False, 164: True}  # name → bottleneck (authors' configs)


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
