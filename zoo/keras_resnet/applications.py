"""keras.applications ResNets (V1 and V2), built with keras.applications' own arguments and
ported into kode (:func:`kode.tools.port.port_model`), with the preprocessing their ImageNet
weights expect.
"""

from __future__ import annotations

import os

import keras

from kode.errors import KodeError, one_line
from kode.gradients import check_gradient_mode
from kode.integrators import get_integrator
from kode.tools.port import port_model
from zoo.registry import arguments_checked

#: keras.applications ResNets that :func:`keras_resnet` ports, with the preprocessing their
#: ImageNet weights expect (on 0–255 RGB pixels): V2 "tf" mode x/127.5 − 1, V1 "caffe" mode
#: RGB→BGR minus the ImageNet BGR mean.
_SCALE_MINUS1_1 = {"kind": "scale", "scale": 1 / 127.5, "offset": -1.0}


_CAFFE = {"kind": "caffe", "mean": [103.939, 116.779, 123.68]}


KERAS_RESNETS: dict[str, tuple[str, dict]] = {
    "resnet50v2": ("ResNet50V2", _SCALE_MINUS1_1),
    "resnet101v2": ("ResNet101V2", _SCALE_MINUS1_1),
    "resnet152v2": ("ResNet152V2", _SCALE_MINUS1_1),
    "resnet50": ("ResNet50", _CAFFE),
    "resnet101": ("ResNet101", _CAFFE),
    "resnet152": ("ResNet152", _CAFFE),
}


def keras_resnet_preprocessing(arch: str) -> dict:
    """The preprocessing description (kode.json kinds) of a keras.applications ResNet."""
    return dict(KERAS_RESNETS[_arch_key(arch)][1])


def _arch_key(arch: str) -> str:
    key = str(arch).lower().removeprefix("keras_")
    if key not in KERAS_RESNETS:
        raise KodeError(f"unknown keras.applications ResNet '{arch}'; choose one of "
                        f"{', '.join(v for v, _ in KERAS_RESNETS.values())}")
    return key


def keras_resnet(
    arch: str,
    *,
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str | None = None,
    gradient: str = "backprop",
    recompute: bool = True,
) -> keras.Model:
    """keras.applications ``arch`` (e.g. "ResNet50V2"), built with the same arguments, ported.

    ``weights``: None (random), a weights file (``.h5`` as keras.applications' ImageNet
    downloads, or ``.weights.h5``), or "imagenet": keras.applications downloads the ImageNet
    file to ~/.keras/models and loads it with ``model.load_weights(file)``, exactly as for a
    file given here; the port then copies the loaded weights.
    """
    key = _arch_key(arch)
    builder = getattr(keras.applications, KERAS_RESNETS[key][0])
    if weights not in (None, "imagenet") and not os.path.isfile(str(weights)):
        raise KodeError(f"weights file '{weights}' does not exist")
    if input_shape is not None and (len(input_shape) != 3 or min(input_shape[:2]) < 32):
        raise KodeError(f"input_shape {tuple(input_shape)} is invalid for "
                        f"{KERAS_RESNETS[key][0]}: (height, width, channels) with height and "
                        "width >= 32")
    check_gradient_mode(gradient, get_integrator("euler" if key.endswith("v2")
                                                 else "post_activation_euler"))
    arguments_checked()
    try:
        source = builder(include_top=include_top, weights=weights, input_shape=input_shape,
                         pooling=pooling, classes=classes,
                         classifier_activation=classifier_activation)
    except Exception as err:  # keras raises ValueError, OSError, URL errors… on bad weights
        detail = one_line(err)
        raise KodeError(f"could not build {KERAS_RESNETS[key][0]} with weights={weights!r}: "
                        f"{detail}") from None
    return port_model(source, gradient=gradient, name=name or f"keras_{key}", copy=False,
                      segments=recompute)
