"""The catalogue of known datasets (:class:`DatasetInfo`, shapes, splits, normalization
constants) and the ``tf.data`` plumbing every dataset's pipeline shares: normalization,
seeded augmentation, batching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from kode.errors import KodeError

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
    #: where a folder or tfds:NAME dataset came from (folder, split, files' hash, skipped
    #: files; tfds name and data_dir); None for the built-in datasets
    source: dict | None = None


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


def _check_name(name: Any) -> str:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _SPECS:
        raise KodeError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return key


def held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The test split of examples without one: a boolean mask holding out, per class in label
    order, round(n·``fraction``) of its n examples (at least one, never all) drawn by one
    permutation per class of ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        held = min(len(members) - 1, max(1, round(len(members) * fraction)))
        mask[members[rng.permutation(len(members))[:held]]] = True
    return mask


def channel_statistics(images: tf.data.Dataset, channels: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std of x = pixel / 255 over every pixel of ``images`` (unbatched,
    0–255): E[x] and sqrt(E[x²] − E[x]²), accumulated in float64 in the dataset's order; a
    constant channel gets std 1 (left unscaled)."""
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for batch in images.batch(256).as_numpy_iterator():
        x = batch.astype(np.float64).reshape(-1, channels) / 255.0
        total, squares, count = total + x.sum(0), squares + np.square(x).sum(0), count + len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)


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
    load_fn: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None,
) -> tf.data.Dataset:
    """Seeded shuffle (anew every pass), ``load_fn`` (e.g. decode files: after the shuffle,
    so the buffer holds names, not images), augmentation, batch, prefetch."""
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if load_fn is not None:
        ds = ds.map(load_fn, num_parallel_calls=AUTOTUNE)
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


def dataset_names() -> list[str]:
    """Names accepted by :func:`~kode.data.load_dataset` and :func:`~kode.data.dataset_info`,
    sorted."""
    return sorted(_SPECS)
