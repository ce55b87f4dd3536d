"""Datasets: one ``tf.data`` pipeline per dataset, offline by default, failing fast otherwise.

Every pipeline yields ``(images, labels)`` batches: images float32 NHWC normalized as
``(x / pixel_max - mean) / std`` with the per-channel ``mean``/``std`` of :class:`DatasetInfo`
(``pixel_max`` is 16 for digits and 255 otherwise), labels int32. The train split is shuffled
(seeded, reshuffled every epoch) and optionally augmented; the test split is neither.

Datasets
--------
- ``digits`` (the default; embedded, no network, no preparation): scikit-learn's bundled
  ``load_digits()``, 1797 grey images of 8x8 with values 0..16. Fixed split, the same on
  every machine: ``train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)`` gives
  1437 train and 360 test images. Its mean/std are computed on that train split (one channel).
- ``mnist``, ``cifar10``, ``cifar100``: TensorFlow Datasets, read from a *prepared*
  ``data_dir`` (``tfds build NAME --data_dir DIR`` on a machine with network access). CIFAR
  mean/std are the usual constants; MNIST uses 0.1307/0.3081.
- ``imagenet2012``: TensorFlow Datasets from a prepared ``data_dir``, or prepared locally (no
  network) from the manual files ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``
  in ``manual_dir``. Its ``validation`` split is the test split.

Nothing here ever downloads. A tfds dataset that is not prepared raises :class:`KodeError` at
once, saying how to prepare it; building the tfds builder does not touch the network either
(GCS lookups are forced off while it is built).

Augmentation (``augment``; default on for CIFAR and ImageNet, off for digits and MNIST)
-----------------------------------------------------------------------------------------
- CIFAR (He et al. 2016, as in Lu et al. 2018): pad 4 pixels with zeros, random 32x32 crop,
  random horizontal flip. Padding happens after normalization (the cached data are already
  normalized), so the zeros are the dataset-mean colour, as in fb.resnet.torch; no reflection.
- digits / MNIST: a random translation only (pad 1 / 2 pixels with zeros, again after
  normalization, random crop back to the original size); no flip, digits are not symmetric.
- ImageNet train: random-resized crop (area 8%-100%, aspect ratio 3/4-4/3) to 224x224 and a
  random horizontal flip; test: resize the shorter side to 256, center crop 224x224.

Random augmentations use stateless ops seeded from ``seed`` (one seed pair per element, new
every epoch), so a run is reproducible and parallel mapping keeps it deterministic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from kode.errors import KodeError

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "dataset_names",
    "load_dataset",
    "preprocess_images",
]

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    ``input_shape`` is (H, W, C) of what the model receives (after cropping/resizing);
    ``mean``/``std`` are per channel, in [0, 1] pixel units; ``train_size``/``test_size`` are
    the numbers of examples in the splits (the canonical sizes when a tfds dataset is not
    prepared yet, the real ones once it is).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class _Spec:
    """Static description of a known dataset (internal)."""

    num_classes: int
    input_shape: tuple[int, int, int]
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float
    augment_default: bool
    pad: int  # translation augmentation: zero padding before the random crop (0: none)
    flip: bool
    test_split: str = "test"
    class_names: tuple[str, ...] | None = None


_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# CIFAR-100 fine labels, in label order (fine_label_names.txt of the original archive).
_CIFAR100_NAMES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
_DIGIT_NAMES = tuple(str(i) for i in range(10))

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_SIZE = 224
_IMAGENET_RESIZE = 256
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

_SPECS: dict[str, _Spec] = {
    "cifar10": _Spec(
        10, (32, 32, 3), 50_000, 10_000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        255.0, True, 4, True, class_names=_CIFAR10_NAMES,
    ),
    "cifar100": _Spec(
        100, (32, 32, 3), 50_000, 10_000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        255.0, True, 4, True, class_names=_CIFAR100_NAMES,
    ),
    # digits: mean/std are computed from the train split (see _digits_arrays).
    "digits": _Spec(
        10, (8, 8, 1), 1437, 360, (), (), 16.0, False, 1, False, class_names=_DIGIT_NAMES,
    ),
    "imagenet2012": _Spec(
        1000, (_IMAGENET_SIZE, _IMAGENET_SIZE, 3), 1_281_167, 50_000, _IMAGENET_MEAN,
        _IMAGENET_STD, 255.0, True, 0, True, test_split="validation",
    ),
    "mnist": _Spec(
        10, (28, 28, 1), 60_000, 10_000, (0.1307,), (0.3081,), 255.0, False, 2, False,
        class_names=_DIGIT_NAMES,
    ),
}

_TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012", "mnist")
# Above this many training examples the whole split is not held in one shuffle buffer.
_MAX_SHUFFLE_BUFFER = 60_000
_IMAGENET_SHUFFLE_BUFFER = 10_000


# --------------------------------------------------------------------------- public API


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset` and :func:`dataset_info`, sorted."""
    return sorted(_SPECS)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Describe dataset ``name`` without loading its images (and without any network access).

    For a tfds dataset prepared in ``data_dir`` the split sizes and class names are read from
    the prepared data; otherwise the canonical values are returned.
    """
    key = _check_name(name)
    if key == "digits":
        return _digits_info()
    builder = _tfds_builder(key, data_dir)
    with _offline_tfds():
        prepared = builder.is_prepared()
    spec = _SPECS[key]
    train_size, test_size = spec.train_size, spec.test_size
    if prepared:
        splits = builder.info.splits
        if "train" in splits:
            train_size = int(splits["train"].num_examples)
        if spec.test_split in splits:
            test_size = int(splits[spec.test_split].num_examples)
    return _tfds_info(key, builder, train_size, test_size)


def load_dataset(
    name: str = "digits",
    *,
    batch_size: int = 128,
    augment: bool | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """Build the train and test pipelines of dataset ``name``.

    Args:
        name: one of :func:`dataset_names`.
        batch_size: examples per batch (the last batch may be smaller).
        augment: augment the train split; ``None`` picks the dataset's default (on for
            CIFAR/ImageNet, off for digits/MNIST). See the module docstring for what it does.
        data_dir: tfds data directory holding the prepared dataset (tfds' default,
            ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, when ``None``). Unused by digits.
        manual_dir: imagenet2012 only: directory with the manual ImageNet tar files, used to
            prepare the dataset locally when it is not prepared in ``data_dir``.
        seed: seed of the shuffling and of the augmentation.
        cache: keep the decoded, normalized images in memory after the first epoch (ignored
            for imagenet2012, which does not fit in memory).

    Returns:
        ``(train, test, info)``: batched datasets of ``(float32 NHWC images, int32 labels)``
        and the :class:`DatasetInfo` with the sizes of the splits actually loaded.

    Raises:
        KodeError: unknown name, bad argument, or a tfds dataset that is not prepared.
    """
    key = _check_name(name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise KodeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size <= 0:
        raise KodeError(f"batch_size must be a positive integer, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise KodeError(f"seed must be an integer, got {seed!r}")
    if augment is not None and not isinstance(augment, (bool, np.bool_)):
        raise KodeError(f"augment must be true, false or None, got {augment!r}")
    if manual_dir is not None and key != "imagenet2012":
        raise KodeError(f"manual_dir is only used by imagenet2012, not by {key!r}")
    spec = _SPECS[key]
    do_augment = spec.augment_default if augment is None else bool(augment)
    batch_size, seed = int(batch_size), int(seed)

    if key == "digits":
        return _load_digits(
            batch_size=batch_size, augment=do_augment, seed=seed, cache=cache,
        )
    if key == "imagenet2012":
        return _load_imagenet(
            batch_size=batch_size, augment=do_augment, data_dir=data_dir,
            manual_dir=manual_dir, seed=seed,
        )
    return _load_small_tfds(
        key, batch_size=batch_size, augment=do_augment, data_dir=data_dir, seed=seed,
        cache=cache,
    )


def preprocess_images(pixels_0_to_1: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Normalize images with pixel values in [0, 1]: ``(x - mean) / std`` per channel.

    This is exactly the transform the pipelines apply after dividing by ``pixel_max`` (same
    float32 operations in the same order). ``pixels_0_to_1`` has channels last, shape (..., C);
    it is not resized: give it the model's spatial size. Returns a float32 array.
    """
    x = np.asarray(pixels_0_to_1)
    channels = len(info.mean)
    if x.ndim < 3 or x.shape[-1] != channels:
        raise KodeError(
            f"{info.name} images must have shape (..., H, W, {channels}) with channels last, "
            f"got {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise KodeError(f"images must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise KodeError(
            f"pixel values must lie in [0, 1] (divide by the maximum pixel value first), "
            f"got range [{x.min()}, {x.max()}]"
        )
    mean = np.asarray(info.mean, dtype=np.float32)
    std = np.asarray(info.std, dtype=np.float32)
    return (x - mean) / std


# --------------------------------------------------------------------------- helpers


def _check_name(name: Any) -> str:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _SPECS:
        raise KodeError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return key


def _normalizer(
    pixel_max: float, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[tf.Tensor], tf.Tensor]:
    """The pipelines' normalization, op for op the same as :func:`preprocess_images`."""
    pmax = tf.constant(pixel_max, tf.float32)
    mean_t = tf.constant(np.asarray(mean, np.float32))
    std_t = tf.constant(np.asarray(std, np.float32))

    def normalize(images: tf.Tensor) -> tf.Tensor:
        return (tf.cast(images, tf.float32) / pmax - mean_t) / std_t

    return normalize


def _seeds(seed: int) -> tf.data.Dataset:
    """An endless stream of stateless seed pairs, different every epoch, fixed by ``seed``."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _translate_flip(image: tf.Tensor, seed: tf.Tensor, pad: int, flip: bool) -> tf.Tensor:
    """Zero-pad by ``pad``, random crop back to the input size, random left-right flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if pad:
        shape = tf.shape(image)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, shape, seed=crop_seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def _batch_train(
    ds: tf.data.Dataset,
    *,
    buffer: int,
    seed: int,
    augment_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None,
    batch_size: int,
) -> tf.data.Dataset:
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if augment_fn is not None:
        ds = tf.data.Dataset.zip((ds, _seeds(seed))).map(
            lambda xy, s: (augment_fn(xy[0], s), xy[1]), num_parallel_calls=AUTOTUNE
        )
    return ds.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)


def _small_pipelines(
    train: tf.data.Dataset,
    test: tf.data.Dataset,
    *,
    spec: _Spec,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train_size: int,
    batch_size: int,
    augment: bool,
    seed: int,
    cache: bool,
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Normalize (and cache) both splits, then shuffle/augment/batch/prefetch."""
    normalize = _normalizer(spec.pixel_max, mean, std)

    def prepare(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return normalize(image), tf.cast(label, tf.int32)

    train = train.map(prepare, num_parallel_calls=AUTOTUNE)
    test = test.map(prepare, num_parallel_calls=AUTOTUNE)
    if cache:
        train, test = train.cache(), test.cache()
    augment_fn = None
    if augment:
        pad, flip = spec.pad, spec.flip

        def augment_fn(image: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
            return _translate_flip(image, s, pad, flip)

    train = _batch_train(
        train, buffer=max(1, min(train_size, _MAX_SHUFFLE_BUFFER)), seed=seed,
        augment_fn=augment_fn, batch_size=batch_size,
    )
    test = test.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)
    return train, test


# --------------------------------------------------------------------------- digits

_digits_cache: dict[str, Any] = {}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(x_train, y_train, x_test, y_test, mean, std); images uint8 (N, 8, 8, 1) in 0..16."""
    if "arrays" not in _digits_cache:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.uint8)[..., None]  # values 0..16, exact integers
        y = digits.target.astype(np.int32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, random_state=0, stratify=y
        )
        pixels = x_train.astype(np.float64) / _SPECS["digits"].pixel_max
        _digits_cache["arrays"] = (
            x_train, y_train, x_test, y_test, float(pixels.mean()), float(pixels.std())
        )
    return _digits_cache["arrays"]


def _digits_info() -> DatasetInfo:
    x_train, _, x_test, _, mean, std = _digits_arrays()
    spec = _SPECS["digits"]
    return DatasetInfo(
        name="digits", num_classes=spec.num_classes, input_shape=spec.input_shape,
        train_size=len(x_train), test_size=len(x_test), mean=(mean,), std=(std,),
        class_names=_DIGIT_NAMES,
    )


def _load_digits(
    *, batch_size: int, augment: bool, seed: int, cache: bool
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    x_train, y_train, x_test, y_test, _, _ = _digits_arrays()
    info = _digits_info()
    train, test = _small_pipelines(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        spec=_SPECS["digits"], mean=info.mean, std=info.std, train_size=info.train_size,
        batch_size=batch_size, augment=augment, seed=seed, cache=cache,
    )
    return train, test, info


# --------------------------------------------------------------------------- tfds


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


# --------------------------------------------------------------------------- imagenet


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
