"""``tf.data.Dataset``s as a dataset: ``kode.train(model, train_ds, validation=test_ds)``
(``kode.finetune`` and ``kode.tune`` alike).

- Elements are ``(image, label)`` pairs (batches of them are unbatched): images (H, W) or
  (H, W, C) of pixel values 0–255 with 1 to 4 channels, of a static height and width unless
  ``image_size`` is given, converted as ``kode predict`` converts them
  (:func:`kode.images.to_channels`); integer labels 0 … K − 1 (named "0" … "K−1").
- Registration reads every element once: the labels (for the class count and, without
  ``validation``, the seeded per-class split of :func:`kode.data.pipelines.held_out`, applied
  by position in the stream), the pixel range (0–255 required), and a SHA-256 of the
  elements' bytes, which names the data: ``datasets:<16 hex digits>`` in the run's settings,
  ``kode.json`` and the resume fingerprint.
- Normalization: ``(x / 255 − mean) / std`` per channel over the train split
  (:func:`kode.data.pipelines.channel_statistics`). Nothing is cached in memory.

The datasets must give the same elements in the same order every time they are iterated (a
resumed run, the gradient guard's batch and the statistics pass each iterate them again); a
shuffled source would train, but not resume bit for bit.
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

PREFIX = "datasets:"


@dataclass(frozen=True)
class _Streams:
    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    labels: np.ndarray  # of train, in stream order
    test_labels: np.ndarray | None
    shape: tuple  # (H, W, C) of the elements; H, W may be None


_registry: dict[str, _Streams] = {}


def _elements(ds: object, what: str) -> tf.data.Dataset:
    """``ds`` as unbatched (image, label) elements; KodeError if it is not such a dataset."""
    spec = getattr(ds, "element_spec", None)
    if not isinstance(ds, tf.data.Dataset) or not isinstance(spec, tuple) or len(spec) != 2:
        raise KodeError(f"{what} must be a tf.data.Dataset of (image, label) pairs")
    image, label = spec
    if label.shape.rank == 1:  # batches
        ds = ds.unbatch()
        image, label = ds.element_spec
    if image.shape.rank == 2:  # grey images without a channel axis
        ds = ds.map(lambda x, y: (x[..., None], y))
        image, label = ds.element_spec
    if image.shape.rank != 3 or image.shape[-1] not in (1, 2, 3, 4) or label.shape.rank != 0:
        raise KodeError(f"{what} must give (image, label) pairs with images (H, W, C), C in "
                        f"1..4, and scalar labels; got {image.shape} and {label.shape}")
    if not label.dtype.is_integer:
        raise KodeError(f"{what} labels must be integers, got {label.dtype.name}")
    return ds


def _read(ds: tf.data.Dataset, what: str, digest) -> np.ndarray:
    """One pass: the labels, the pixel range checked, the bytes hashed."""
    labels = []
    for images, batch_labels in ds.batch(256).as_numpy_iterator():
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
            raise KodeError(f"{what} images must hold pixel values in 0-255, got "
                            f"[{images.min()}, {images.max()}]")
        digest.update(np.ascontiguousarray(images).tobytes())
        labels.append(batch_labels)
    if not labels:
        raise KodeError(f"{what} is empty")
    labels = np.concatenate(labels).astype(np.int64)
    if labels.min() < 0:
        raise KodeError(f"{what} labels must be >= 0, got {labels.min()}")
    digest.update(labels.tobytes())
    return labels


def register_datasets(train: object, validation: object = None) -> str:
    """Check and read ``train`` (and ``validation``) once, keep them in this process and
    return the name the run's settings use (``datasets:<hash>``)."""
    train = _elements(train, "dataset")
    digest = hashlib.sha256()
    labels = _read(train, "dataset", digest)
    test_labels = None
    if validation is not None:
        validation = _elements(validation, "validation")
        if validation.element_spec[0].shape[-1] != train.element_spec[0].shape[-1]:
            raise KodeError("validation images have another number of channels than the "
                            "dataset's")
        test_labels = _read(validation, "validation", digest)
    if len(np.unique(labels)) < 2:
        raise KodeError("dataset has one class only; a classifier needs at least two")
    name = PREFIX + digest.hexdigest()[:16]
    _registry[name] = _Streams(train, validation, labels, test_labels,
                               tuple(train.element_spec[0].shape))
    return name


def _get(name: str) -> _Streams:
    if name not in _registry:
        raise KodeError(f"dataset {name} is not known to this process: pass the "
                        "tf.data.Dataset itself")
    return _registry[name]


def _split(streams: _Streams, fraction: float, seed: int):
    """(train, test, train labels, test labels): the validation dataset, or the held-out
    positions of the train stream."""
    if streams.validation is not None:
        return streams.train, streams.validation, streams.labels, streams.test_labels
    test = held_out(streams.labels, fraction, seed)
    if not test.any():
        raise KodeError("dataset has too few examples to hold out a test split (one per "
                        "class); pass validation=")
    mask = tf.constant(test)

    def part(held: bool) -> tf.data.Dataset:
        return streams.train.enumerate().filter(
            lambda i, xy: tf.equal(tf.gather(mask, i), held)).map(lambda i, xy: xy)

    return part(False), part(True), streams.labels[~test], streams.labels[test]


def streams_info(name: str, *, image_size: int | None = None, validation_split: float = 0.2,
                 seed: int = 0, mean: tuple = (), std: tuple = ()) -> DatasetInfo:
    """The :class:`DatasetInfo` of registered datasets (mean/std empty until measured)."""
    streams = _get(name)
    _, _, labels, test_labels = _split(streams, validation_split, seed)
    height, width, channels = streams.shape
    if image_size is None and (height is None or width is None):
        raise KodeError("the dataset's images vary in size: give image_size")
    height, width = (image_size, image_size) if image_size else (height, width)
    classes = int(max(labels.max(), test_labels.max())) + 1
    return DatasetInfo(
        name="datasets", num_classes=classes,
        input_shape=(int(height), int(width), 1 if channels <= 2 else 3),
        train_size=len(labels), test_size=len(test_labels), mean=mean, std=std,
        class_names=tuple(str(k) for k in range(classes)),
        source={"datasets": name, "split": "validation dataset" if streams.validation
                is not None else f"validation_split {validation_split}, seed {seed}"},
    )


def load_streams(name: str, *, image_size: int | None, validation_split: float, seed: int,
                 batch_size: int, augment: bool
                 ) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """The train and test pipelines of registered datasets (see the module docstring)."""
    info = streams_info(name, image_size=image_size, validation_split=validation_split,
                        seed=seed)
    streams = _get(name)
    train, test, _, _ = _split(streams, validation_split, seed)
    height, width, channels = info.input_shape
    resize = (height, width) != streams.shape[:2]

    def convert(image, label):
        image = to_channels(tf.cast(tf.round(tf.cast(image, tf.float32)), tf.uint8), channels)
        image = tf.cast(image, tf.float32)
        if resize:
            image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
        return tf.ensure_shape(image, [height, width, channels]), tf.cast(label, tf.int32)

    train = train.map(convert, num_parallel_calls=AUTOTUNE)
    test = test.map(convert, num_parallel_calls=AUTOTUNE)
    mean, std = channel_statistics(train.map(lambda x, y: x), channels)
    info = streams_info(name, image_size=image_size, validation_split=validation_split,
                        seed=seed, mean=mean, std=std)
    spec = _Spec(info.num_classes, info.input_shape, info.train_size, info.test_size, mean, std,
                 255.0, False, max(1, height // 8), True)
    train, test = _small_pipelines(
        train, test, spec=spec, mean=mean, std=std, train_size=info.train_size,
        batch_size=batch_size, augment=augment, seed=seed, cache=False)
    return train, test, info
