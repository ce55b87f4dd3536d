"""tensorflow-datasets sources, offline: prepared ``data_dir`` folders for MNIST and CIFAR, and
ImageNet prepared locally from its manual tar files. Nothing here downloads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from kode.data.pipelines import (
    _IMAGENET_RESIZE,
    _IMAGENET_SHUFFLE_BUFFER,
    _IMAGENET_SIZE,
    _IMAGENET_TARS,
    _SPECS,
    AUTOTUNE,
    DatasetInfo,
    _normalizer,
    _seeds,
    _small_pipelines,
)
from kode.errors import KodeError


@contextlib.contextmanager
def _offline_tfds() -> Iterator[Any]:
    """Import tfds with GCS lookups forced off and its 'no dataset_info.json' warning muted.

    tfds 4.9.10 already disables GCS by default, older releases did not: building a builder
    for an unprepared dataset then asked gs://tfds-data for its metadata over the network.
    """
    import logging

    import tensorflow_datasets as tfds

    try:
        from tensorflow_datasets.core.utils import gcs_utils
    except ImportError:  # pragma: no cover - layout of other tfds releases
        gcs_utils = None
    had_flag = gcs_utils is not None and hasattr(gcs_utils, "_is_gcs_disabled")
    old_flag = gcs_utils._is_gcs_disabled if had_flag else None
    absl_logger = logging.getLogger("absl")
    old_level = absl_logger.level
    try:
        if had_flag:
            gcs_utils._is_gcs_disabled = True
        absl_logger.setLevel(max(old_level, logging.ERROR))
        yield tfds
    finally:
        absl_logger.setLevel(old_level)
        if had_flag:
            gcs_utils._is_gcs_disabled = old_flag


def _resolve_dir(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(os.fspath(path))


def _tfds_builder(key: str, data_dir: str | None) -> Any:
    with _offline_tfds() as tfds:
        return tfds.builder(key, data_dir=_resolve_dir(data_dir), try_gcs=False)


def _not_prepared(key: str, root: Any) -> KodeError:
    if key == "imagenet2012":
        return KodeError(
            f"dataset 'imagenet2012' is not prepared in {root}; put the manual files "
            f"{' and '.join(_IMAGENET_TARS)} (from image-net.org) in a directory and pass "
            "--manual-dir DIR to prepare it locally, or prepare it elsewhere with "
            "'tfds build imagenet2012 --manual_dir M --data_dir DIR' and pass --data-dir DIR"
        )
    return KodeError(
        f"dataset {key!r} is not prepared in {root}; prepare it on a machine with network "
        f"access with 'tfds build {key} --data_dir DIR' and pass --data-dir DIR"
    )


def _tfds_splits(
    key: str, builder: Any, *, seed: int, decoders: dict[str, Any] | None = None
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Train and test splits as (image, label) datasets; KodeError when not prepared."""
    spec = _SPECS[key]
    try:
        with _offline_tfds() as tfds:
            read_config = tfds.ReadConfig(shuffle_seed=seed)
            train = builder.as_dataset(
                split="train", as_supervised=True, shuffle_files=True,
                read_config=read_config, decoders=decoders,
            )
            test = builder.as_dataset(
                split=spec.test_split, as_supervised=True, shuffle_files=False,
                decoders=decoders,
            )
    except AssertionError as err:  # tfds: "could not find data in DIR"
        raise _not_prepared(key, builder.data_dir_root) from err
    return train, test


def _size(ds: tf.data.Dataset, fallback: int) -> int:
    n = int(ds.cardinality())
    return n if n >= 0 else fallback


def _tfds_info(key: str, builder: Any, train_size: int, test_size: int) -> DatasetInfo:
    spec = _SPECS[key]
    names = tuple(str(n) for n in builder.info.features["label"].names)
    placeholder = names == tuple(str(i) for i in range(len(names)))
    if spec.class_names is not None and (placeholder or len(names) != spec.num_classes):
        # CIFAR label names come from the downloaded archive: before preparation (or under
        # tfds.testing.mock_data) tfds only knows "0".."9".
        names = spec.class_names
    return DatasetInfo(
        name=key, num_classes=spec.num_classes, input_shape=spec.input_shape,
        train_size=train_size, test_size=test_size, mean=spec.mean, std=spec.std,
        class_names=names,
    )


def _load_small_tfds(
    key: str, *, batch_size: int, augment: bool, data_dir: str | None, seed: int, cache: bool
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    spec = _SPECS[key]
    builder = _tfds_builder(key, data_dir)
    train, test = _tfds_splits(key, builder, seed=seed)
    info = _tfds_info(
        key, builder, _size(train, spec.train_size), _size(test, spec.test_size)
    )
    train, test = _small_pipelines(
        train, test, spec=spec, mean=spec.mean, std=spec.std, train_size=info.train_size,
        batch_size=batch_size, augment=augment, seed=seed, cache=cache,
    )
    return train, test, info


def _prepare_imagenet(builder: Any, manual_dir: str | None) -> None:
    """Prepare imagenet2012 from the manual tar files (local work only, never a download)."""
    with _offline_tfds():
        if builder.is_prepared():
            return
    if manual_dir is None:
        raise _not_prepared("imagenet2012", builder.data_dir_root)
    manual = _resolve_dir(manual_dir)
    missing = [f for f in _IMAGENET_TARS if not os.path.isfile(os.path.join(manual, f))]
    if missing:
        raise KodeError(
            f"imagenet2012 is not prepared and --manual-dir {manual} lacks "
            f"{', '.join(missing)}; download them from image-net.org (registration needed)"
        )
    with _offline_tfds() as tfds:
        config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
        builder.download_and_prepare(download_config=config)


def _imagenet_train_map(
    normalize: Callable[[tf.Tensor], tf.Tensor], augment: bool
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    size = _IMAGENET_SIZE

    def train_map(jpeg: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        if not augment:
            return _imagenet_eval(jpeg, normalize)
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(jpeg),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=box_seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        offset_y, offset_x, _ = tf.unstack(begin)
        height, width, _ = tf.unstack(crop_size)
        image = tf.image.decode_and_crop_jpeg(
            jpeg, tf.stack([offset_y, offset_x, height, width]), channels=3
        )
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return normalize(image)

    return train_map


def _imagenet_eval(jpeg: tf.Tensor, normalize: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Resize the shorter side to 256, center crop 224x224, normalize."""
    image = tf.image.decode_jpeg(jpeg, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = _IMAGENET_RESIZE / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), _IMAGENET_RESIZE)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = (new_shape[0] - _IMAGENET_SIZE) // 2
    left = (new_shape[1] - _IMAGENET_SIZE) // 2
    image = image[top : top + _IMAGENET_SIZE, left : left + _IMAGENET_SIZE, :]
    image = tf.ensure_shape(image, [_IMAGENET_SIZE, _IMAGENET_SIZE, 3])
    return normalize(image)


def _load_imagenet(
    *, batch_size: int, augment: bool, data_dir: str | None, manual_dir: str | None, seed: int
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    import tensorflow_datasets as tfds

    key = "imagenet2012"
    spec = _SPECS[key]
    builder = _tfds_builder(key, data_dir)
    if manual_dir is not None:
        _prepare_imagenet(builder, manual_dir)
    # JPEG bytes are decoded in our own map (decode_and_crop_jpeg decodes only the crop).
    train, test = _tfds_splits(
        key, builder, seed=seed, decoders={"image": tfds.decode.SkipDecoding()}
    )
    info = _tfds_info(key, builder, _size(train, spec.train_size), _size(test, spec.test_size))
    normalize = _normalizer(spec.pixel_max, spec.mean, spec.std)
    train_map = _imagenet_train_map(normalize, augment)
    train = train.shuffle(_IMAGENET_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    train = tf.data.Dataset.zip((train, _seeds(seed))).map(
        lambda xy, s: (train_map(xy[0], s), tf.cast(xy[1], tf.int32)),
        num_parallel_calls=AUTOTUNE,
    )
    train = train.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)
    test = test.map(
        lambda jpeg, label: (_imagenet_eval(jpeg, normalize), tf.cast(label, tf.int32)),
        num_parallel_calls=AUTOTUNE,
    )
    test = test.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)
    return train, test, info
