"""``tfds:NAME`` and ``tfds:NAME/CONFIG``: any image-classification dataset of TensorFlow
Datasets, read from a *prepared* ``data_dir`` (nothing is downloaded; an unprepared one is one
line with the ``tfds build`` command).

- The dataset must have supervised keys (image, label) with an image feature and a class
  label; the class names and split sizes come from its info.
- Splits: ``train``, and ``test`` (else ``validation``) as the test split; a dataset with only
  ``train`` holds out its last 20% (tfds' ``train[80%:]``, the same on every machine).
- Images are converted to 1 or 3 channels as ``kode predict`` converts them
  (:func:`kode.images.to_channels`) and, when ``image_size`` is given or the dataset's images
  vary in size, resized to ``image_size`` (default 32) with bilinear antialiased resampling.
- Normalization: ``(x / 255 − mean) / std`` per channel, mean/std over the pixels of the first
  :data:`STATISTICS_EXAMPLES` training images (in the prepared order, not shuffled),
  computed once per process.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from kode.data.pipelines import (
    AUTOTUNE,
    DatasetInfo,
    _small_pipelines,
    _Spec,
    channel_statistics,
)
from kode.data.tfds import _not_prepared, _offline_tfds, _resolve_dir
from kode.errors import KodeError, one_line
from kode.images import to_channels

#: Training images the mean/std are measured on.
STATISTICS_EXAMPLES = 10_000

#: Side of variable-size images when no image_size is given.
DEFAULT_SIZE = 32


def _key(name: str) -> str:
    key = name.strip().lower().removeprefix("tfds:").strip()
    if not key:
        raise KodeError("tfds: needs a dataset name, e.g. tfds:mnist or tfds:NAME/CONFIG")
    return key


def _builder(name: str, data_dir: str | None) -> Any:
    """The prepared builder of ``tfds:NAME``; KodeError if unknown or not prepared."""
    key = _key(name)
    with _offline_tfds() as tfds:
        try:
            builder = tfds.builder(key, data_dir=_resolve_dir(data_dir), try_gcs=False)
        except Exception as err:  # DatasetNotFoundError, unknown config, bad version, …
            raise KodeError(f"unknown tfds dataset {key!r}: {one_line(err)}") from None
        prepared = builder.is_prepared()
    if not prepared:
        raise _not_prepared(key, builder.data_dir_root)
    return builder


def _keys(builder: Any, key: str) -> tuple[str, str, Any, int]:
    """(image key, label key, image shape, number of classes), checked."""
    import tensorflow_datasets as tfds

    supervised = builder.info.supervised_keys
    if not supervised or len(supervised) != 2 or not all(isinstance(k, str) for k in supervised):
        raise KodeError(f"tfds dataset {key!r} has no (image, label) supervised keys; kode "
                        "trains image classifiers")
    image_key, label_key = supervised
    image, label = builder.info.features[image_key], builder.info.features[label_key]
    if not isinstance(image, tfds.features.Image) or not isinstance(label,
                                                                     tfds.features.ClassLabel):
        raise KodeError(f"tfds dataset {key!r} is not an image classification dataset "
                        f"({image_key}: {type(image).__name__}, {label_key}: "
                        f"{type(label).__name__})")
    return image_key, label_key, tuple(image.shape), int(label.num_classes)


def _splits(builder: Any) -> tuple[str, str]:
    splits = builder.info.splits
    if "train" not in splits:
        raise KodeError(f"tfds dataset {builder.name!r} has no train split "
                        f"(splits: {', '.join(splits)})")
    for test in ("test", "validation"):
        if test in splits:
            return "train", test
    return "train[:80%]", "train[80%:]"


def _shape(image_shape: tuple, image_size: int | None) -> tuple[int, int, int]:
    height, width, channels = image_shape
    channels = 1 if channels == 1 else 3
    if image_size is None and height is not None and width is not None:
        return int(height), int(width), channels
    size = DEFAULT_SIZE if image_size is None else int(image_size)
    return size, size, channels


def named_info(name: str, data_dir: str | None, *, image_size: int | None = None,
               mean: tuple = (), std: tuple = ()) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``tfds:NAME`` (mean/std empty until measured)."""
    key = _key(name)
    builder = _builder(name, data_dir)
    _, label_key, image_shape, classes = _keys(builder, key)
    train_split, test_split = _splits(builder)
    sizes = [int(builder.info.splits[s].num_examples) for s in (train_split, test_split)]
    names = tuple(str(n) for n in builder.info.features[label_key].names)
    return DatasetInfo(
        name=f"tfds:{key}", num_classes=classes, input_shape=_shape(image_shape, image_size),
        train_size=sizes[0], test_size=sizes[1], mean=mean, std=std, class_names=names,
        source={"tfds": key, "data_dir": str(builder.data_dir_root),
                "splits": [train_split, test_split]},
    )


_stats_cache: dict[tuple, tuple] = {}


def _statistics(train: tf.data.Dataset, key: tuple, channels: int) -> tuple[tuple, tuple]:
    """:func:`channel_statistics` over the first :data:`STATISTICS_EXAMPLES` images of
    ``train``, once per process."""
    if key not in _stats_cache:
        _stats_cache[key] = channel_statistics(train.take(STATISTICS_EXAMPLES), channels)
    return _stats_cache[key]


def load_named(name: str, data_dir: str | None, *, image_size: int | None, batch_size: int,
               augment: bool, seed: int, cache: bool
               ) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """The train and test pipelines of ``tfds:NAME`` (see the module docstring); ``augment``:
    a random translation by up to size/8 pixels and a random horizontal flip."""
    info = named_info(name, data_dir, image_size=image_size)
    builder = _builder(name, data_dir)
    height, width, channels = info.input_shape
    train_split, test_split = info.source["splits"]
    resize = image_size is not None or info.input_shape[:2] != _keys(builder, _key(name))[2][:2]

    def convert(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = to_channels(image, channels)
        if resize:
            image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
        return tf.ensure_shape(tf.cast(image, tf.float32), [height, width, channels]), label

    with _offline_tfds():
        train, test = (builder.as_dataset(split=s, as_supervised=True, shuffle_files=False)
                       .map(convert, num_parallel_calls=AUTOTUNE)
                       for s in (train_split, test_split))
    mean, std = _statistics(train.map(lambda x, y: x),
                            (info.source["tfds"], info.source["data_dir"], info.input_shape),
                            channels)
    info = named_info(name, data_dir, image_size=image_size, mean=mean, std=std)
    spec = _Spec(info.num_classes, info.input_shape, info.train_size, info.test_size, mean, std,
                 255.0, False, max(1, height // 8), True)
    train, test = _small_pipelines(
        train, test, spec=spec, mean=mean, std=std, train_size=info.train_size,
        batch_size=batch_size, augment=augment, seed=seed, cache=cache)
    return train, test, info
