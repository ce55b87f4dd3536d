"""keras.applications ResNets at test size: built by keras.applications' own ResNet and
residual-stack code, so they have ResNet50V2's / ResNet50's layers, layer names and graph
(stem conv1_*/pool1_*, stacks conv2…conv5 of conv{k}_block{j}_* blocks, post_bn for V2), but
narrow bottlenecks and few blocks: a port or fine-tuning test runs in seconds, not minutes.

:func:`tiny_keras_resnet` builds one; :func:`tiny_keras_applications_builder` gives a builder
with keras.applications.ResNet50V2's keywords, which a test puts in place of
``keras.applications.ResNet50V2`` (``monkeypatch.setattr``) so that everything resolving the
name (``kode finetune ResNet50V2``, ``zoo.create_model("keras_resnet50v2")``) builds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import keras

from kode.compat import keras_applications_resnet, keras_applications_resnet_stack

if TYPE_CHECKING:
    import pytest

#: Blocks per stack (conv2…conv5) by default: one identity block, hence one Euler step, per
#: stage. A V2 stack's last block (stride 2, max-pool shortcut) and first block (projection
#: shortcut) are not x + f(x); a V1 stack's first block (projection shortcut) is not.
TINY_BLOCKS = {"v2": (3, 3, 3, 2), "v1": (2, 2, 2, 2)}

#: Bottleneck filters per stack (keras.applications: 64, 128, 256, 512); stacks output 4×.
TINY_FILTERS = (4, 4, 8, 8)


def _stack_fn(version: str, blocks: Sequence[int], filters: Sequence[int]) -> Callable:
    """ResNet50V2's / ResNet50's ``stack_fn`` with other block counts and filters."""
    stack = keras_applications_resnet_stack(version)
    # Where keras.applications puts stride 1: V2's last stack, V1's first one.
    strides = (2, 2, 2, 1) if version == "v2" else (1, 2, 2, 2)

    def stack_fn(x):
        for k, (n, f, s) in enumerate(zip(blocks, filters, strides, strict=True), start=2):
            x = stack(x, f, n, stride1=s, name=f"conv{k}")
        return x

    return stack_fn


def tiny_keras_resnet(
    version: str = "v2",
    *,
    blocks: Sequence[int] | None = None,
    filters: Sequence[int] = TINY_FILTERS,
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = (32, 32, 3),
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """A keras.applications ResNet ``version`` "v2" (ResNet50V2's graph) or "v1" (ResNet50's)
    with ``blocks`` and ``filters`` per stack; the other arguments are keras.applications'."""
    if version not in TINY_BLOCKS:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    blocks = tuple(blocks or TINY_BLOCKS[version])
    # Fewer blocks make keras.applications' stack reuse a block name (V2) or build no stack.
    if len(blocks) != 4 or min(blocks) < (2 if version == "v2" else 1):
        raise ValueError(f"blocks must be 4 numbers of blocks per stack, each >= "
                         f"{2 if version == 'v2' else 1} for {version}, got {blocks}")
    if weights == "imagenet":  # keras.applications would build it with random weights
        raise ValueError("a tiny keras.applications ResNet has no ImageNet weights")
    return keras_applications_resnet()(
        _stack_fn(version, blocks, tuple(filters)), preact=version == "v2", use_bias=True,
        include_top=include_top, weights=weights, input_shape=input_shape, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation,
        name=name or f"tiny_resnet_{version}")


def tiny_keras_applications_builder(version: str = "v2", **tiny: object) -> Callable:
    """A builder with keras.applications.ResNet50V2's (or ResNet50's) keywords that builds
    ``tiny_keras_resnet(version, **tiny)``: to stand in for the keras.applications name."""

    def builder(include_top: bool = True, weights: str | None = None,
                input_shape: tuple[int, int, int] | None = None, pooling: str | None = None,
                classes: int = 1000, classifier_activation: str | None = "softmax",
                name: str | None = None) -> keras.Model:
        return tiny_keras_resnet(version, include_top=include_top, weights=weights,
                                 input_shape=input_shape, pooling=pooling, classes=classes,
                                 classifier_activation=classifier_activation, name=name,
                                 **tiny)

    return builder


def stand_in_for(monkeypatch: pytest.MonkeyPatch, arch: str = "ResNet50V2",
                 **tiny: object) -> Callable:
    """Make ``keras.applications.<arch>`` (e.g. "ResNet50V2", "ResNet101") build a tiny
    ResNet of the same version for the rest of the test (pytest's ``monkeypatch`` undoes it);
    ``tiny``: :func:`tiny_keras_resnet`'s ``blocks`` and ``filters``. Returns the builder."""
    builder = tiny_keras_applications_builder("v2" if arch.endswith("V2") else "v1", **tiny)
    # The real name is replaced (not a kode lookup table): kode resolves it as for users.
    monkeypatch.setattr(keras.applications, arch, builder)
    return builder


#: keras.applications ResNets and the tiny blocks that stand in for them in the zoo's
#: keras_resnet family tests: the same version, one more block in the third stack per depth
#: (so 50, 101 and 152 differ only in their number of steps, as the real ones do).
TINY_STAND_INS = {
    "ResNet50V2": ("v2", (3, 3, 3, 2)), "ResNet101V2": ("v2", (3, 3, 4, 2)),
    "ResNet152V2": ("v2", (3, 3, 5, 2)), "ResNet50": ("v1", (2, 2, 2, 2)),
    "ResNet101": ("v1", (2, 2, 3, 2)), "ResNet152": ("v1", (2, 2, 4, 2)),
}


@contextlib.contextmanager
def tiny_keras_applications() -> Iterator[None]:
    """Inside the block every keras.applications ResNet name of :data:`TINY_STAND_INS` builds
    its tiny stand-in (restored after, also on an error)."""
    saved = {arch: getattr(keras.applications, arch) for arch in TINY_STAND_INS}
    try:
        for arch, (version, blocks) in TINY_STAND_INS.items():
            setattr(keras.applications, arch,
                    tiny_keras_applications_builder(version, blocks=blocks))
        yield
    finally:
        for arch, builder in saved.items():
            setattr(keras.applications, arch, builder)
