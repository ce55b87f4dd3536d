"""A folder of images as a dataset: ``PATH/<class>/<image>`` (the layout of
``keras.utils.image_dataset_from_directory``), or ``PATH/train/<class>/…`` and
``PATH/test/<class>/…``.

- Classes are the class folders' names, sorted; label k is the k-th name. Images may sit in
  sub-folders of a class folder; names starting with "." are ignored, and so are files that
  are not ``.png``, ``.jpg``/``.jpeg``, ``.bmp`` or ``.gif`` (a GIF gives its first frame).
- Without ``test/``, each class's files (sorted) are split by one seeded permutation: round(n·
  ``validation_split``) of them (at least one, never all) go to the test split.
- Channels: 1 when every image is grey (with or without alpha), else 3; converted as
  ``kode predict`` converts them (:func:`kode.images.to_channels`). Every image is resized
  (bilinear, antialiased, aspect ratio not kept) to ``image_size`` x ``image_size``.
- Normalization: ``(x / 255 − mean) / std`` per channel, mean and std over every pixel of the
  train split after resizing (E[x] and sqrt(E[x²] − E[x]²), accumulated in float64, file by
  file in sorted order). That pass decodes every file of both splits once, with the decoder
  the pipeline uses, so an unreadable or truncated image is found before training starts.
- The pipelines decode inside ``tf.data``: file names → seeded shuffle (train) → parallel
  decode/resize/normalize → batch → prefetch. Nothing holds the whole folder in memory.

:func:`scan_folder` reads only the directory tree and the images' headers (no TensorFlow):
it is the check a run makes before it writes anything. ``ImageFolder.sha256`` hashes the sorted
relative paths and sizes: a resumed run refuses a folder that changed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from kode.data.pipelines import (
    AUTOTUNE,
    DatasetInfo,
    _batch_train,
    _normalizer,
    _translate_flip,
    held_out,
)
from kode.errors import KodeError, one_line
from kode.images import GREY_MODES, to_channels

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

_SKIP_HINT = "fix or remove it, or skip unreadable images with --skip-bad-images " \
             "(skip_bad_images=True)"


@dataclass(frozen=True)
class ImageFolder:
    """What :func:`scan_folder` found: the files of each split as (relative path, label)."""

    root: str
    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]
    split: str  #: "test folder", or how the test split was drawn
    channels: int
    sha256: str
    skipped: tuple[str, ...] = ()  #: unreadable files left out (skip_bad_images)

    def describe(self) -> dict:
        """The record of the folder in ``kode.json`` / ``metrics.json``."""
        return {"folder": self.root, "split": self.split, "files_sha256": self.sha256,
                "skipped": list(self.skipped)}


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _class_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), relative to it, sorted."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = _visible(dirs)
        for name in _visible(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(here, name), folder))
    return sorted(found)


def _classes(folder: str, shown: str) -> dict[str, list[str]]:
    """{class name: its image files relative to ``folder``}; KodeError for an empty folder or
    an empty class folder."""
    names = [n for n in _visible(os.listdir(folder)) if os.path.isdir(os.path.join(folder, n))]
    if not names:
        raise KodeError(f"dataset folder {shown} has no class folders: put each class's images "
                        "in a sub-folder named after the class")
    classes = {}
    for name in names:
        files = _class_files(os.path.join(folder, name))
        if not files:
            raise KodeError(f"class folder {os.path.join(shown, name)} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        classes[name] = [os.path.join(name, f) for f in files]
    return classes


def _split(classes: dict[str, list[str]], fraction: float, seed: int, shown: str):
    items = [(rel, label) for label, files in enumerate(classes.values()) for rel in files]
    test = held_out(np.asarray([label for _, label in items]), fraction, seed)
    if not test.any():
        raise KodeError(f"dataset folder {shown} has too few images to hold out a test split "
                        "(every class has one image); add images or a test/ folder")
    return ([item for item, t in zip(items, test, strict=True) if not t],
            [item for item, t in zip(items, test, strict=True) if t])


def _check_classes(classes: dict, shown: str) -> None:
    if len(classes) < 2:
        raise KodeError(f"dataset folder {shown} has one class only ({next(iter(classes))}); "
                        "a classifier needs at least two class folders")


def _header_channels(path: str) -> int:
    """1 for a grey image, 3 otherwise, from the file's header; KodeError if it is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return 1 if img.mode in GREY_MODES else 3
    except UnidentifiedImageError:
        reason = "not a PNG, JPEG, BMP or GIF image"
    except (OSError, ValueError, SyntaxError) as err:
        reason = one_line(err)
    raise KodeError(f"cannot read image {path}: {reason}; {_SKIP_HINT}")


def scan_folder(path: str, *, validation_split: float = 0.2, seed: int = 0,
                skip_bad_images: bool = False) -> ImageFolder:
    """Describe the image folder ``path`` (its tree and the images' headers; no TensorFlow).

    Raises KodeError for a missing or empty folder, a class folder without images, a single
    class, a file whose header is not an image (unless ``skip_bad_images``), a bad split.
    """
    shown = os.fspath(path)
    root = os.path.abspath(os.path.expanduser(shown))
    if not os.path.isdir(root):
        raise KodeError(f"dataset folder {shown} does not exist")
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) \
            or not 0 < validation_split < 1:
        raise KodeError(f"validation_split must be a number in (0, 1), got {validation_split!r}")
    has_test = all(os.path.isdir(os.path.join(root, n)) for n in ("train", "test"))
    if has_test:
        classes = _classes(os.path.join(root, "train"), os.path.join(shown, "train"))
        _check_classes(classes, os.path.join(shown, "train"))
        test_classes = _classes(os.path.join(root, "test"), os.path.join(shown, "test"))
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise KodeError(f"{os.path.join(shown, 'test')} has classes that train/ has not: "
                            f"{', '.join(unknown)}")
        labels = {name: k for k, name in enumerate(classes)}
        train = [(os.path.join("train", f), labels[c]) for c, fs in classes.items() for f in fs]
        test = [(os.path.join("test", f), labels[c]) for c, fs in test_classes.items()
                for f in fs]
        split = "test folder"
    else:
        classes = _classes(root, shown)
        _check_classes(classes, shown)
        train, test = _split(classes, validation_split, seed, shown)
        split = f"validation_split {validation_split}, seed {seed}"
    listing = sorted(train + test)
    digest = hashlib.sha256()
    for rel, _ in listing:
        digest.update(f"{rel}\t{os.path.getsize(os.path.join(root, rel))}\n".encode())
    channels, skipped = 1, []
    for rel, _ in listing:
        try:
            channels = max(channels, _header_channels(os.path.join(root, rel)))
        except KodeError:
            if not skip_bad_images:
                raise
            skipped.append(rel)
    folder = ImageFolder(root, tuple(classes), tuple(train), tuple(test), split, channels,
                         digest.hexdigest(), ())
    return _without(folder, skipped)


def _without(folder: ImageFolder, bad: list[str]) -> ImageFolder:
    """``folder`` without the files ``bad`` (recorded as skipped); KodeError if a split is
    left empty."""
    if not bad:
        return folder
    gone = set(bad)
    train = tuple(item for item in folder.train if item[0] not in gone)
    test = tuple(item for item in folder.test if item[0] not in gone)
    if not train or not test:
        raise KodeError(f"every image of the {'train' if not train else 'test'} split of "
                        f"{folder.root} is unreadable")
    return replace(folder, train=train, test=test,
                   skipped=tuple(sorted({*folder.skipped, *bad})))


def image_loader(size: int, channels: int):
    """path → float32 (size, size, channels) pixels 0–255: ``tf.io.decode_image`` (PNG, JPEG,
    BMP, GIF's first frame), :func:`~kode.images.to_channels`, bilinear antialiased resize."""

    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
        image = to_channels(image, channels)
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return tf.ensure_shape(image, [size, size, channels])

    return load


def _pixel_moments(folder: ImageFolder, size: int, skip_bad_images: bool):
    """Decode every file once (both splits, in a parallel tf.data map): per-channel sums of
    x and x² (x = pixel / 255) over the train split, and the files that failed to decode."""
    load = image_loader(size, folder.channels)
    files = sorted(rel for rel, _ in folder.train + folder.test)

    def moments(index, path):
        x = tf.reshape(tf.cast(load(path), tf.float64) / 255.0, [-1, folder.channels])
        return index, tf.reduce_sum(x, 0), tf.reduce_sum(tf.square(x), 0), tf.shape(x)[0]

    # A file that fails to decode drops out of the stream (ignore_errors): its index is missing.
    ds = tf.data.Dataset.from_tensor_slices(
        (np.arange(len(files)), [os.path.join(folder.root, rel) for rel in files]))
    ds = ds.map(moments, num_parallel_calls=AUTOTUNE, deterministic=True)
    train = {rel for rel, _ in folder.train}
    total, squares, count, seen = 0.0, 0.0, 0, set()
    for index, s1, s2, n in ds.ignore_errors(log_warning=False).as_numpy_iterator():
        seen.add(int(index))
        if files[index] in train:  # sums in sorted file order: the same floats on every run
            total, squares, count = total + s1, squares + s2, count + int(n)
    bad = [rel for i, rel in enumerate(files) if i not in seen]
    if bad and not skip_bad_images:
        path = os.path.join(folder.root, bad[0])
        raise KodeError(f"cannot read image {path}: {_reason(path)}; {_SKIP_HINT}")
    return total, squares, count, bad


def _reason(path: str) -> str:
    """Why a file failed to decode, in Pillow's words: TensorFlow's decoder would log its own
    complaint to the terminal (before kode's one line) if it were asked again."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as err:
        return one_line(err)
    return "TensorFlow's image decoder cannot decode it"


_stats_cache: dict[tuple, tuple] = {}


def folder_statistics(folder: ImageFolder, size: int,
                      skip_bad_images: bool = False) -> tuple[ImageFolder, tuple, tuple]:
    """(folder without unreadable files, mean, std) per channel over the train split
    (see the module docstring), computed once per folder content and image size."""
    key = (folder.root, folder.sha256, folder.train, size, folder.channels, skip_bad_images)
    if key not in _stats_cache:
        total, squares, count, bad = _pixel_moments(folder, size, skip_bad_images)
        kept = _without(folder, bad)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
        std = np.where(std > 0, std, 1.0)  # a constant channel: leave it unscaled
        _stats_cache[key] = (kept, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    return _stats_cache[key]


def folder_info(folder: ImageFolder, size: int, mean: tuple = (), std: tuple = ()
                ) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``folder`` at ``size`` (mean/std empty until measured)."""
    return DatasetInfo(
        name=os.path.basename(folder.root), num_classes=len(folder.class_names),
        input_shape=(size, size, folder.channels), train_size=len(folder.train),
        test_size=len(folder.test), mean=mean, std=std, class_names=folder.class_names,
        source=folder.describe(),
    )


def load_folder(folder: ImageFolder, *, size: int, batch_size: int, augment: bool, seed: int,
                skip_bad_images: bool = False
                ) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """The train and test pipelines of ``folder`` (see the module docstring); ``augment``:
    a random translation by up to size/8 pixels and a random horizontal flip."""
    folder, mean, std = folder_statistics(folder, size, skip_bad_images)
    info = folder_info(folder, size, mean, std)
    load = image_loader(size, folder.channels)
    normalize = _normalizer(255.0, mean, std)

    def files(items):
        paths = [os.path.join(folder.root, rel) for rel, _ in items]
        labels = np.asarray([label for _, label in items], np.int32)
        return tf.data.Dataset.from_tensor_slices((paths, labels))

    def decode(path, label):
        return normalize(load(path)), label

    augment_fn = None
    if augment:
        pad = max(1, size // 8)

        def augment_fn(image: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
            return _translate_flip(image, s, pad, True)

    train = _batch_train(files(folder.train), buffer=len(folder.train), seed=seed,
                         augment_fn=augment_fn, batch_size=batch_size, load_fn=decode)
    test = files(folder.test).map(decode, num_parallel_calls=AUTOTUNE)
    return train, test.batch(batch_size).prefetch(AUTOTUNE), info
