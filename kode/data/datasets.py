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

Your own data (see :mod:`kode.data.folders` and :mod:`kode.data.tfds_named`)
--------------------------------------------------------------------------
- a path to a folder of images, one sub-folder per class (or ``train/`` and ``test/`` with
  that layout inside);
- ``tfds:NAME`` or ``tfds:NAME/CONFIG``: any image-classification dataset of TensorFlow
  Datasets prepared in ``data_dir``.

The built-in names win over a folder of the same name (write ``./digits`` for the folder).

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

import os
from typing import Any

import numpy as np
import tensorflow as tf

from kode.data.pipelines import (
    _DIGIT_NAMES,
    _SPECS,
    DatasetInfo,
    _check_name,
    _small_pipelines,
    dataset_names,
)
from kode.data.tfds import (
    _load_imagenet,
    _load_small_tfds,
    _not_prepared,
    _offline_tfds,
    _tfds_builder,
    _tfds_info,
)
from kode.errors import KodeError

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "dataset_kind",
    "dataset_label",
    "dataset_names",
    "load_dataset",
    "preprocess_images",
]


#: Side of a folder's images when nobody says (kode train uses the zoo model's layout).
FOLDER_IMAGE_SIZE = 32


def dataset_kind(name: object) -> str:
    """"builtin" (one of :func:`dataset_names`), "tfds" (``tfds:NAME[/CONFIG]``) or "folder"
    (an existing directory); KodeError for anything else, naming what is accepted."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if isinstance(name, str):
        if name.strip().lower() in dataset_names():
            return "builtin"
        if name.strip().lower().startswith("tfds:"):
            return "tfds"
        if name.startswith("arrays:"):
            return "arrays"
        if name.startswith("datasets:"):
            return "datasets"
        if os.path.isdir(os.path.expanduser(name)):
            return "folder"
        if os.sep in name or "/" in name or name.startswith((".", "~")):
            raise KodeError(f"dataset folder {name} does not exist")
    raise KodeError(f"unknown dataset {name!r}; give one of {', '.join(dataset_names())}, a "
                    "folder of images (one sub-folder per class) or tfds:NAME")


def dataset_label(name: str) -> str:
    """A short name of the dataset for folder names: the built-in name, the folder's base
    name, or the tfds name with "/" replaced by "-"."""
    kind = dataset_kind(name)
    if kind == "folder":
        return os.path.basename(os.path.abspath(os.path.expanduser(os.fspath(name))))
    if kind in ("tfds", "arrays", "datasets"):
        return name.strip().lower().replace("/", "-").replace(":", "-")
    return name.strip().lower()


def dataset_info(name: str, data_dir: str | None = None, *, image_size: int | None = None,
                 validation_split: float = 0.2, seed: int = 0,
                 skip_bad_images: bool = False) -> DatasetInfo:
    """Describe dataset ``name`` without loading its images (and without any network access).

    For a tfds dataset prepared in ``data_dir`` the split sizes and class names are read from
    the prepared data; otherwise the canonical values are returned. A folder is scanned
    (its tree and the images' headers); its mean/std are empty until :func:`load_dataset`
    measures them.
    """
    kind = dataset_kind(name)
    if kind == "folder":
        from kode.data.folders import folder_info, scan_folder

        folder = scan_folder(name, validation_split=validation_split, seed=seed,
                             skip_bad_images=skip_bad_images)
        return folder_info(folder, _folder_size(image_size))
    if kind == "tfds":
        from kode.data.tfds_named import named_info

        return named_info(name, data_dir, image_size=image_size)
    if kind == "arrays":
        from kode.data.arrays import arrays_info

        return arrays_info(name, image_size=image_size, validation_split=validation_split,
                           seed=seed)
    if kind == "datasets":
        from kode.data.streams import streams_info

        return streams_info(name, image_size=image_size, validation_split=validation_split,
                            seed=seed)
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


def check_prepared(name: str, data_dir: str | None = None,
                   manual_dir: str | None = None, **options) -> None:
    """Raise the :class:`KodeError` :func:`load_dataset` raises for a tfds dataset that is not
    prepared in ``data_dir``, without reading it (a run checks this before it configures
    TensorFlow). imagenet2012 with ``manual_dir`` is prepared by :func:`load_dataset`. A folder
    is scanned (:func:`kode.data.folders.scan_folder`: empty folders, empty class folders, a
    single class, files that are not images); ``options`` are :func:`dataset_info`'s."""
    kind = dataset_kind(name)
    if kind != "builtin":
        if manual_dir is not None:
            raise KodeError(f"manual_dir is only used by imagenet2012, not by {name}")
        dataset_info(name, data_dir, **options)
        return
    key = _check_name(name)
    if key == "digits" or (key == "imagenet2012" and manual_dir is not None):
        return
    builder = _tfds_builder(key, data_dir)
    with _offline_tfds():
        prepared = builder.is_prepared()
    if not prepared:
        raise _not_prepared(key, builder.data_dir_root)


def load_dataset(
    name: str = "digits",
    *,
    batch_size: int = 128,
    augment: bool | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
    image_size: int | None = None,
    validation_split: float = 0.2,
    skip_bad_images: bool = False,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """Build the train and test pipelines of dataset ``name``.

    Args:
        name: one of :func:`dataset_names`, a folder of images or ``tfds:NAME[/CONFIG]``.
        batch_size: examples per batch (the last batch may be smaller).
        augment: augment the train split; ``None`` picks the dataset's default (on for
            CIFAR/ImageNet, off for digits/MNIST). See the module docstring for what it does.
        data_dir: tfds data directory holding the prepared dataset (tfds' default,
            ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, when ``None``). Unused by digits.
        manual_dir: imagenet2012 only: directory with the manual ImageNet tar files, used to
            prepare the dataset locally when it is not prepared in ``data_dir``.
        seed: seed of the shuffling and of the augmentation.
        cache: keep the decoded, normalized images in memory after the first epoch (ignored
            for imagenet2012 and folders, which need not fit in memory).
        image_size: folders and tfds:NAME: the side the images are resized to (default: 32
            for a folder, the dataset's own size for tfds).
        validation_split: folders without a test/ folder: the fraction of each class held
            out as the test split (drawn with ``seed``).
        skip_bad_images: folders: leave out unreadable images (recorded in
            ``info.source["skipped"]``) instead of refusing the folder.

    Returns:
        ``(train, test, info)``: batched datasets of ``(float32 NHWC images, int32 labels)``
        and the :class:`DatasetInfo` with the sizes of the splits actually loaded.

    Raises:
        KodeError: unknown name, bad argument, or a tfds dataset that is not prepared.
    """
    kind = dataset_kind(name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise KodeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size <= 0:
        raise KodeError(f"batch_size must be a positive integer, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise KodeError(f"seed must be an integer, got {seed!r}")
    if augment is not None and not isinstance(augment, (bool, np.bool_)):
        raise KodeError(f"augment must be true, false or None, got {augment!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(
            image_size, (int, np.integer)) or image_size < 1):
        raise KodeError(f"image_size must be a positive integer, got {image_size!r}")
    if kind == "folder":
        from kode.data.folders import load_folder, scan_folder

        if manual_dir is not None:
            raise KodeError(f"manual_dir is only used by imagenet2012, not by {name}")
        folder = scan_folder(name, validation_split=validation_split, seed=int(seed),
                             skip_bad_images=skip_bad_images)
        return load_folder(folder, size=_folder_size(image_size), batch_size=int(batch_size),
                           augment=bool(augment), seed=int(seed),
                           skip_bad_images=skip_bad_images)
    if kind == "tfds":
        from kode.data.tfds_named import load_named

        if manual_dir is not None:
            raise KodeError(f"manual_dir is only used by imagenet2012, not by {name}")
        return load_named(name, data_dir, image_size=image_size, batch_size=int(batch_size),
                          augment=bool(augment), seed=int(seed), cache=cache)
    if kind == "arrays":
        from kode.data.arrays import load_arrays

        return load_arrays(name, image_size=image_size, validation_split=validation_split,
                           seed=int(seed), batch_size=int(batch_size), augment=bool(augment),
                           cache=cache)
    if kind == "datasets":
        from kode.data.streams import load_streams

        return load_streams(name, image_size=image_size, validation_split=validation_split,
                            seed=int(seed), batch_size=int(batch_size), augment=bool(augment))
    if image_size is not None:
        raise KodeError(f"image_size is for folders and tfds:NAME datasets; {name} has its "
                        "own size")
    key = _check_name(name)
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


def _folder_size(image_size: int | None) -> int:
    return FOLDER_IMAGE_SIZE if image_size is None else int(image_size)


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
