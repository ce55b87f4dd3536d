"""The one network skeleton every family shares: stem → stages → head.

A stage whose input and output shapes differ starts with a :class:`TransitionBlock`; the rest
of the stage is one :class:`IntegratorStage`. Families differ only in the integrator they pass.
Layouts follow Lu et al. / He et al. (docs/reference.md §2): CIFAR (depth 6n+2 basic, 9n+2
bottleneck, widths 16/32/64) and ImageNet (18/34 basic, 50/101/152 bottleneck).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from kode.errors import KodeError, one_line
from kode.gradients import check_gradient_mode
from kode.integrators import Integrator, get_integrator
from kode.io import check_keras_file, load_keras_file
from kode.layers.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth, _bn, _conv
from kode.layers.stage import (
    IntegratorStage,
    TransitionBlock,
    integrator_stages,
    resolve_step_size,
    set_gradient_mode,
)
from zoo.registry import arguments_checked, register_model

IMAGENET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                   152: (3, 8, 36, 3)}
MIN_INPUT_SIZE = {"cifar": 8, "imagenet": 32}
DEFAULT_INPUT_SHAPE = {"cifar": (32, 32, 3), "imagenet": (224, 224, 3)}


@dataclass(frozen=True)
class Layout:
    """Blocks per stage, stage widths, strides and the residual function kind."""

    stage_blocks: tuple[int, ...]
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    bottleneck: bool
    stem: str  # "cifar": conv3×3; "imagenet": conv7×7/2 + max-pool 3×3/2
    #: Stem output channels; None: 16 (cifar) or 64 (imagenet).
    stem_width: int | None = None
    #: Builds a stage's shape-changing first block as
    #: ``transition(in_channels, out_channels, stride, make_function, name)`` → a layer
    #: returning [x, history] (RevNet's split downsampling unit); None: TransitionBlock(f, P).
    transition: Callable | None = None


def resolve_layout(layout: str | Layout, depth: int, bottleneck: bool | None) -> Layout:
    """The stage layout for a depth, or a :class:`KodeError` naming the family's form."""
    if isinstance(layout, Layout):
        return layout
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise KodeError(f"depth must be an integer, got {depth!r}")
    if layout == "cifar":
        bottleneck = bool(bottleneck)
        per_block, form = (9, "9n+2 (bottleneck)") if bottleneck else (6, "6n+2 (basic)")
        n, rest = divmod(depth - 2, per_block)
        if rest or n < 1:
            raise KodeError(
                f"depth {depth} is not of the CIFAR form {form}, e.g. "
                f"{', '.join(str(per_block * k + 2) for k in (1, 3, 5, 9))}"
            )
        return Layout((n, n, n), (16, 32, 64), (1, 2, 2), bottleneck, "cifar")
    if layout == "imagenet":
        if depth not in IMAGENET_STAGES:
            raise KodeError(
                f"depth {depth} is not an ImageNet layout; choose one of "
                f"{', '.join(map(str, IMAGENET_STAGES))}"
            )
        return Layout(IMAGENET_STAGES[depth], (64, 128, 256, 512), (1, 2, 2, 2),
                      depth >= 50 if bottleneck is None else bool(bottleneck), "imagenet")
    raise KodeError(f"unknown layout '{layout}'; choose 'cifar' or 'imagenet'")


def _check_input_shape(input_shape, layout: str) -> tuple[int, int, int]:
    shape = DEFAULT_INPUT_SHAPE[layout] if input_shape is None else tuple(input_shape)
    minimum = MIN_INPUT_SIZE[layout]
    if (
        len(shape) != 3
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or min(shape[:2]) < minimum
    ):
        raise KodeError(
            f"input_shape {shape} is invalid: expected (height, width, channels) with height and "
            f"width >= {minimum} for the {layout} layout"
        )
    return shape


def _check_head(include_top: bool, weights, pooling, classes, classifier_activation) -> None:
    if pooling not in (None, "avg", "max"):
        raise KodeError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if include_top and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
        raise KodeError(f"classes must be a positive integer with include_top, got {classes!r}")
    if weights is not None and not (isinstance(weights, str | os.PathLike)):
        raise KodeError(f"weights must be None or a path to a weights file, got {weights!r}")
    if weights is not None and not os.path.isfile(weights):
        raise KodeError(f"weights file '{weights}' does not exist")
    if weights is not None and str(weights).endswith(".keras"):
        check_keras_file(weights)  # before the model is built


def _describe(name: str, shapes: list[tuple], stage_steps: list[int]) -> str:
    parameters = sum(int(np.prod(shape)) for shape in shapes)
    stages = f"stages of {'/'.join(map(str, stage_steps))} steps, " if stage_steps else ""
    return f"{name} ({stages}{len(shapes)} weight tensors, {parameters:,} parameters)"


def _stage_steps(model: keras.Model) -> list[int]:
    return [stage.num_steps for stage in integrator_stages(model)]


def _h5_layout(path: str) -> tuple[list[tuple], list[int]]:
    """Shapes of every weight tensor in a ``.weights.h5`` file, and its stages' step counts."""
    import h5py

    shapes: list[tuple] = []
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda _, obj: shapes.append(tuple(obj.shape))
                      if isinstance(obj, h5py.Dataset) else None)
        layers_group = fh.get("layers", {})
        stages = sorted((k for k in layers_group if k.startswith("integrator_stage")),
                        key=lambda k: int(k.rpartition("_")[2]) if k[-1].isdigit() else -1)
        steps = [len(layers_group[k].get("residual_functions", {})) for k in stages]
    return shapes, steps


def _load_weights(model: keras.Model, path: str, include_top: bool, classes: int) -> None:
    """Load a ``.keras`` model's or a ``.weights.h5`` file's weights into ``model``; refuse a
    file of another architecture (other number or shapes of weight tensors), naming both.

    Keras' ``load_weights`` matches h5 weights by layer name and skips the rest, so a resnet32
    file would half-load into a resnet20 without a word: the shapes are compared first.
    """
    path = str(path)
    target = [tuple(w.shape) for w in model.weights]
    try:
        if path.endswith(".keras"):
            source = load_keras_file(path)
            theirs, source_name = [tuple(w.shape) for w in source.weights], source.name
            their_steps = _stage_steps(source)
        else:
            source, source_name = None, "another network"
            theirs, their_steps = _h5_layout(path)
        if sorted(theirs) != sorted(target) or (source is not None and theirs != target):
            raise KodeError(f"weights file '{path}' holds the weights of "
                            f"{_describe(source_name, theirs, their_steps)}, not of "
                            f"{_describe(model.name, target, _stage_steps(model))} built with "
                            f"include_top={include_top}, classes={classes}; build the same "
                            f"model and options as the file's")
        if source is not None:
            model.set_weights(source.get_weights())
        else:
            model.load_weights(path)
    except KodeError:
        raise
    except Exception as err:  # corrupt or mismatched files raise many different types
        detail = one_line(err)
        raise KodeError(
            f"weights file '{path}' could not be loaded into {model.name} "
            f"(include_top={include_top}, classes={classes}): {detail}"
        ) from None


def integrator_resnet(
    integrator: str | dict | Integrator,
    depth: int,
    *,
    layout: str | Layout = "cifar",
    bottleneck: bool | None = None,
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = 10,
    classifier_activation: str | None = "softmax",
    name: str | None = None,
    step_size: float | str = 1.0,
    horizon: float = 1.0,
    width_multiplier: float = 1.0,
    groups: int = 1,
    group_width: int | None = None,
    final_survival_probability: float | None = None,
    zero_init: bool = False,
    integrator_config: dict | None = None,
    gradient: str = "backprop",
    recompute: bool = True,
) -> keras.Model:
    """Build stem → stages → head with every stage integrated by ``integrator``.

    ``step_size`` is h (1 = classic ResNet) or ``"ode"`` for h = horizon/N per stage.
    ``final_survival_probability`` p_L turns on LM stochastic depth: block l of L survives
    with p_l = 1 − (l/L)(1 − p_L). ``groups``/``group_width`` make ResNeXt bottlenecks.
    ``gradient`` ("backprop" | "checkpoint" | "adjoint") is how every stage is differentiated
    in training. Transitions are not invertible: with ``recompute`` (the default) they keep
    only their input in "checkpoint" and "adjoint" and recompute their activations in the
    backward; ``recompute=False`` lets them backpropagate.
    """
    spec = resolve_layout(layout, depth, bottleneck)
    shape = _check_input_shape(input_shape, spec.stem)
    _check_head(include_top, weights, pooling, classes, classifier_activation)
    try:
        integrator = get_integrator(integrator, **(integrator_config or {}))
    except (TypeError, ValueError) as err:
        raise KodeError(str(err)) from None
    check_gradient_mode(gradient, integrator)
    if not isinstance(recompute, bool):
        raise KodeError(f"recompute must be True or False, got {recompute!r}")
    if not (math.isfinite(width_multiplier) and width_multiplier > 0):
        raise KodeError(f"width_multiplier must be a finite positive number, got "
                        f"{width_multiplier!r}")
    if final_survival_probability is not None and not 0 < final_survival_probability <= 1:
        raise KodeError(
            f"final_survival_probability must be in (0, 1], got {final_survival_probability}"
        )
    resolve_step_size(step_size, 1, horizon)  # (a stage checks it too, once built)
    arguments_checked()

    def scaled(c: int) -> int:
        return max(1, int(round(c * width_multiplier)))

    total_blocks = sum(spec.stage_blocks) * integrator.functions_per_step
    block_index = 0

    def residual_function(out_width: int, stage: int, stride: int, block_name: str):
        """f with ``out_width`` output channels (the state's, or its part the scheme gives f)."""
        nonlocal block_index
        block_index += 1
        if spec.bottleneck:
            mid = out_width // 4 if group_width is None else groups * scaled(group_width) * 2**stage
            fn = Bottleneck(mid, out_width, stride, groups, zero_init, name=block_name)
        else:
            fn = BasicBlock(out_width, stride, zero_init, name=block_name)
        if final_survival_probability is not None:
            p = 1.0 - block_index / total_blocks * (1.0 - final_survival_probability)
            fn = StochasticDepth(fn, p, name=f"{block_name}_sd")
        return fn

    inputs = keras.Input(shape)
    stem_width = scaled(spec.stem_width or (16 if spec.stem == "cifar" else 64))
    if spec.stem == "cifar":
        x = _conv(stem_width, 3, name="stem_conv")(inputs)
    else:
        x = _conv(stem_width, 7, 2, name="stem_conv")(inputs)
        x = _bn("stem_bn")(x)
        x = layers.ReLU(name="stem_relu")(x)
        x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)

    channels = stem_width
    for s, (blocks, stride) in enumerate(zip(spec.stage_blocks, spec.strides, strict=True)):
        out_channels = scaled(spec.widths[s]) * (4 if spec.bottleneck else 1)
        history = None
        remaining = blocks
        if stride != 1 or out_channels != channels:
            if spec.transition is None:
                fn = residual_function(out_channels, s, stride, f"stage{s + 1}_transition_f")
                proj = Projection(out_channels, stride, name=f"stage{s + 1}_transition_p")
                block = TransitionBlock(fn, proj, name=f"stage{s + 1}_transition")
            else:
                block = spec.transition(
                    channels, out_channels, stride,
                    lambda width, stride, name, s=s: residual_function(width, s, stride, name),
                    name=f"stage{s + 1}_transition")
            x, history = block(x)
            remaining -= 1
        if remaining:
            f_width = integrator.residual_shape((None, out_channels))[-1]
            fns = [residual_function(f_width, s, 1, f"stage{s + 1}_f{i}")
                   for i in range(remaining * integrator.functions_per_step)]
            stage = IntegratorStage(fns, integrator, step_size, horizon, gradient,
                                    name=f"stage{s + 1}")
            x = stage([x, history] if history is not None and integrator.uses_history else x)
        channels = out_channels

    x = _bn("head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    model = keras.Model(inputs, x, name=name or f"{integrator.name}_resnet{depth}")
    set_gradient_mode(model, gradient, recompute)
    if weights is not None:
        _load_weights(model, weights, include_top, classes)
    return model


CIFAR_DEPTHS = (20, 32, 44, 56, 110, 164, 1202)
IMAGENET_DEPTHS = tuple(IMAGENET_STAGES)


def family_builder(family: str, integrator: str, summary: str) -> Callable[..., keras.Model]:
    """A keras.applications-style builder for one family (one integrator)."""

    def build(depth: int = 20, **kwargs) -> keras.Model:
        kwargs["name"] = kwargs.get("name") or f"{family}{depth}"
        return integrator_resnet(integrator, depth, **kwargs)

    # The same keras.applications-style signature as integrator_resnet, minus the integrator.
    signature = inspect.signature(integrator_resnet)
    depth, *rest = list(signature.parameters.values())[1:]
    build.__signature__ = signature.replace(parameters=[depth.replace(default=20), *rest])
    build.__name__ = build.__qualname__ = family
    build.integrator = integrator  # read by zoo.registry.family_integrator
    build.__doc__ = (
        f"{summary}\n\nArguments as keras.applications (include_top, weights=None|path, "
        "input_shape, pooling, classes, classifier_activation, name) plus ``depth``, "
        "``layout`` ('cifar' | 'imagenet') and the options of "
        ":func:`zoo.builder.integrator_resnet` (step_size, width_multiplier, …)."
    )
    return build


def register_family(family: str, builder: Callable[..., keras.Model],
                    imagenet: bool = True) -> None:
    """Register ``{family}{depth}`` for the CIFAR depths (and the ImageNet layouts)."""
    for depth in CIFAR_DEPTHS:
        register_model(f"{family}{depth}", family, builder, depth=depth, layout="cifar",
                       bottleneck=depth == 164, classes=10)
    for depth in IMAGENET_DEPTHS if imagenet else ():
        register_model(f"{family}{depth}", family, builder, depth=depth, layout="imagenet",
                       classes=1000)
