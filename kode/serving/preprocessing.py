"""Input preprocessing that an exported model runs inside its serving graph.

A preprocessing is a small JSON object stored in ``kode.json`` (key ``"preprocessing"``) and
applied to images with pixel values on the 0–255 scale, channels last:

- ``{"kind": "identity"}``: x, unchanged (a model exported without preprocessing information).
- ``{"kind": "mean_std", "pixel_max": 255, "mean": [...], "std": [...]}``:
  (x / pixel_max − mean) / std per channel, mean/std on the [0, 1] scale (kode's datasets;
  exactly the operations of the training pipelines).
- ``{"kind": "scale", "scale": s, "offset": o}``: x · s + o (keras.applications "tf" mode,
  e.g. ResNetV2: s = 1/127.5, o = −1 maps 0–255 to [−1, 1]).
- ``{"kind": "caffe", "mean": [103.939, 116.779, 123.68]}``: RGB → BGR, then x − mean per BGR
  channel (keras.applications "caffe" mode, e.g. ResNet50 V1); needs 3 channels.

A new kind is one entry of ``_KINDS``: a function that validates and completes the description,
and a function that applies it to a float32 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from kode.errors import KodeError

__all__ = ["IDENTITY", "apply_preprocessing", "check_preprocessing", "mean_std"]

IDENTITY: dict = {"kind": "identity"}
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def mean_std(mean: Any, std: Any, pixel_max: float = 255.0) -> dict:
    """The description of (x / pixel_max − mean) / std (mean/std per channel or one number)."""
    return {"kind": "mean_std", "pixel_max": pixel_max, "mean": mean, "std": std}


def check_preprocessing(description: Any, channels: int | None) -> dict:
    """Validate ``description`` for images with ``channels`` channels; return it completed.

    Raises KodeError naming the bad key. The result is plain JSON (lists and floats).
    """
    if not isinstance(description, dict) or not isinstance(description.get("kind"), str):
        raise KodeError(
            f"preprocessing must be an object with a 'kind' ({', '.join(_KINDS)}), "
            f"got {description!r}"
        )
    kind = description["kind"]
    if kind not in _KINDS:
        raise KodeError(f"unknown preprocessing kind {kind!r}; known kinds: {', '.join(_KINDS)}")
    check, _ = _KINDS[kind]
    params = {k: v for k, v in description.items() if k != "kind"}
    return {"kind": kind, **check(params, channels)}


def apply_preprocessing(description: dict, images: tf.Tensor) -> tf.Tensor:
    """Apply a checked ``description`` to images (any numeric dtype, 0–255); float32 out."""
    _, apply = _KINDS[description["kind"]]
    return apply(description, tf.cast(images, tf.float32))


# --------------------------------------------------------------------------- the kinds


def _channel_values(params: dict, key: str, channels: int | None, *, nonzero: bool = False,
                    default: Any = None) -> list[float]:
    value = params.get(key, default)
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise KodeError(f"preprocessing {key} must be a number or a list of numbers") from None
    if value is None or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise KodeError(f"preprocessing {key}={value!r} must be finite numbers")
    if arr.size != 1 and arr.size != channels:
        raise KodeError(
            f"preprocessing {key}={value!r} must be one number or one per channel ({channels})"
        )
    if nonzero and np.any(arr == 0):
        raise KodeError(f"preprocessing {key}={value!r} contains 0")
    return [float(v) for v in arr]


def _number(params: dict, key: str, default: float | None = None, *, positive: bool = False
            ) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KodeError(f"preprocessing {key}={value!r} must be a finite number")
    if positive and value <= 0:
        raise KodeError(f"preprocessing {key}={value!r} must be > 0")
    return float(value)


def _no_extra(params: dict, allowed: tuple[str, ...], kind: str) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise KodeError(f"preprocessing {kind!r} takes {list(allowed)}, not {extra}")


def _check_identity(params: dict, channels: int | None) -> dict:
    _no_extra(params, (), "identity")
    return {}


def _check_mean_std(params: dict, channels: int | None) -> dict:
    _no_extra(params, ("pixel_max", "mean", "std"), "mean_std")
    return {
        "pixel_max": _number(params, "pixel_max", 255.0, positive=True),
        "mean": _channel_values(params, "mean", channels),
        "std": _channel_values(params, "std", channels, nonzero=True),
    }


def _apply_mean_std(d: dict, x: tf.Tensor) -> tf.Tensor:
    # Same float32 operations, same order, as the training pipelines (kode.data._normalizer).
    mean = tf.constant(np.asarray(d["mean"], np.float32))
    std = tf.constant(np.asarray(d["std"], np.float32))
    return (x / tf.constant(d["pixel_max"], tf.float32) - mean) / std


def _check_scale(params: dict, channels: int | None) -> dict:
    _no_extra(params, ("scale", "offset"), "scale")
    scale = _number(params, "scale")
    if scale == 0:
        raise KodeError("preprocessing scale must not be 0")
    return {"scale": scale, "offset": _number(params, "offset", 0.0)}


def _apply_scale(d: dict, x: tf.Tensor) -> tf.Tensor:
    return x * tf.constant(d["scale"], tf.float32) + tf.constant(d["offset"], tf.float32)


def _check_caffe(params: dict, channels: int | None) -> dict:
    _no_extra(params, ("mean",), "caffe")
    if channels != 3:
        raise KodeError(f"preprocessing 'caffe' needs RGB images (3 channels), not {channels}")
    return {"mean": _channel_values(params, "mean", 3, default=list(_CAFFE_MEAN_BGR))}


def _apply_caffe(d: dict, x: tf.Tensor) -> tf.Tensor:
    return x[..., ::-1] - tf.constant(np.asarray(d["mean"], np.float32))


def _apply_identity(d: dict, x: tf.Tensor) -> tf.Tensor:
    return x


_KINDS: dict[str, tuple[Callable[[dict, int | None], dict], Callable[[dict, tf.Tensor], tf.Tensor]]]
_KINDS = {
    "identity": (_check_identity, _apply_identity),
    "mean_std": (_check_mean_std, _apply_mean_std),
    "scale": (_check_scale, _apply_scale),
    "caffe": (_check_caffe, _apply_caffe),
}
