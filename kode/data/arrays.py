"""Numpy arrays as a dataset: ``kode.train(model, (x, y))`` (optionally ``validation=(x_test,
y_test)``), ``kode.finetune`` and ``kode.tune`` alike.

- ``x``: images as pixel values 0–255 (any real dtype), shape (N, H, W) or (N, H, W, C) with C
  in 1..4, converted to 1 or 3 channels as ``kode predict`` converts them
  (:func:`kode.images.to_channels`; a value outside 0–255 is refused); ``y``: integer labels
  0 … K − 1 (K = max + 1 classes, named "0" … "K−1").
- Without ``validation``, each class is split as a folder is (:func:`kode.data.folders`):
  round(n · ``validation_split``) of its examples, drawn with the run's seed, are the test split.
- Normalization: ``(x / 255 − mean) / std`` per channel over the train split (after resizing
  to ``image_size``, when given: bilinear, antialiased).

The arrays are registered under a name ``arrays:<sha256 of their bytes, 16 hex digits>`` that
the run's settings, ``kode.json`` and the resume fingerprint carry: a resumed run with other
arrays gets another name and is refused. The name is known to this process only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from kode.data.pipelines import (
    AUTOTUNE,
    DatasetInfo,
    _small_pipelines,
    _Spec,
    channel_statistics,
    held_out,
)
from kode.errors import KodeError
from kode.images import to_channels

PREFIX = "arrays:"


@dataclass(frozen=True)
class _Arrays:
    x: np.ndarray  # uint8 (N, H, W, C), C in 1..4
    y: np.ndarray  # int32 (N,)
    x_test: np.ndarray | None
    y_test: np.ndarray | None


_registry: dict[str, _Arrays] = {}


def _images(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not 1 <= x.shape[-1] <= 4 or not len(x):
        raise KodeError(f"{what} must be images of shape (N, H, W) or (N, H, W, C) with C in "
                        f"1..4, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise KodeError(f"{what} must be numeric pixel values 0-255, got dtype {x.dtype}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
        raise KodeError(f"{what} must hold pixel values in 0-255, got [{x.min()}, {x.max()}]")
    if np.issubdtype(x.dtype, np.floating) and x.max() <= 1.0 and x.max() > 0:
        raise KodeError(f"{what} looks scaled to [0, 1]; give pixel values 0-255 (x * 255)")
    return np.round(x).astype(np.uint8)


def _labels(y, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise KodeError(f"{what} must be {n} integer labels >= 0, got shape {y.shape} and "
                        f"dtype {y.dtype}")
    return y.astype(np.int32)


def _pair(pair, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise KodeError(f"{what} must be an (images, labels) pair of arrays")
    x = _images(pair[0], f"{what} images")
    return x, _labels(pair[1], len(x), f"{what} labels")


def is_arrays(dataset: object) -> bool:
    """``dataset`` is an (images, labels) pair of arrays rather than a name."""
    return isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(
        hasattr(part, "__len__") and not isinstance(part, str) for part in dataset)


def register_arrays(dataset: tuple, validation: tuple | None = None) -> str:
    """Check ``dataset`` (and ``validation``), keep them in this process and return the name
    the run's settings use (``arrays:<hash>``)."""
    x, y = _pair(dataset, "dataset")
    x_test = y_test = None
    if validation is not None:
        x_test, y_test = _pair(validation, "validation")
        if x_test.shape[1:] != x.shape[1:]:
            raise KodeError(f"validation images have shape {x_test.shape[1:]}, the dataset's "
                            f"{x.shape[1:]}")
    classes = int(max(y.max(), -1 if y_test is None else y_test.max())) + 1
    if len(np.unique(y)) < 2:
        raise KodeError("dataset has one class only; a classifier needs at least two")
    digest = hashlib.sha256()
    for part in (x, y, x_test, y_test):
        if part is not None:
            digest.update(repr(part.shape).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(str(classes).encode())
    name = PREFIX + digest.hexdigest()[:16]
    _registry[name] = _Arrays(x, y, x_test, y_test)
    return name


def _get(name: str) -> _Arrays:
    if name not in _registry:
        raise KodeError(f"dataset {name} is not known to this process: pass the arrays "
                        "themselves (dataset=(x, y))")
    return _registry[name]


def _split(arrays: _Arrays, fraction: float, seed: int):
    if arrays.x_test is not None:
        return arrays.x, arrays.y, arrays.x_test, arrays.y_test
    test = held_out(arrays.y, fraction, seed)
    if not test.any():
        raise KodeError("dataset has too few examples to hold out a test split (one per "
                        "class); pass validation=(x_test, y_test)")
    return arrays.x[~test], arrays.y[~test], arrays.x[test], arrays.y[test]


def arrays_info(name: str, *, image_size: int | None = None, validation_split: float = 0.2,
                seed: int = 0, mean: tuple = (), std: tuple = ()) -> DatasetInfo:
    """The :class:`DatasetInfo` of registered arrays (mean/std empty until measured)."""
    arrays = _get(name)
    x, y, x_test, y_test = _split(arrays, validation_split, seed)
    classes = int(max(y.max(), y_test.max())) + 1
    height, width = (image_size, image_size) if image_size else x.shape[1:3]
    channels = 1 if x.shape[-1] <= 2 else 3
    return DatasetInfo(
        name="arrays", num_classes=classes, input_shape=(int(height), int(width), channels),
        train_size=len(x), test_size=len(x_test), mean=mean, std=std,
        class_names=tuple(str(k) for k in range(classes)),
        source={"arrays": name, "split": "validation arrays" if arrays.x_test is not None
                else f"validation_split {validation_split}, seed {seed}"},
    )


def load_arrays(name: str, *, image_size: int | None, validation_split: float, seed: int,
                batch_size: int, augment: bool, cache: bool
                ) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """The train and test pipelines of registered arrays (see the module docstring)."""
    info = arrays_info(name, image_size=image_size, validation_split=validation_split,
                       seed=seed)
    x, y, x_test, y_test = _split(_get(name), validation_split, seed)
    height, width, channels = info.input_shape

    def convert(image):
        image = tf.cast(to_channels(image, channels), tf.float32)
        if (height, width) != tuple(x.shape[1:3]):
            image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
        return image

    mean, std = channel_statistics(tf.data.Dataset.from_tensor_slices(x).map(convert), channels)
    info = arrays_info(name, image_size=image_size, validation_split=validation_split,
                       seed=seed, mean=mean, std=std)
    spec = _Spec(info.num_classes, info.input_shape, info.train_size, info.test_size, mean, std,
                 255.0, False, max(1, height // 8), True)
    train, test = (tf.data.Dataset.from_tensor_slices((images, labels)).map(
        lambda image, label: (convert(image), label), num_parallel_calls=AUTOTUNE)
        for images, labels in ((x, y), (x_test, y_test)))
    train, test = _small_pipelines(
        train, test, spec=spec, mean=mean, std=std, train_size=info.train_size,
        batch_size=batch_size, augment=augment, seed=seed, cache=cache)
    return train, test, info
