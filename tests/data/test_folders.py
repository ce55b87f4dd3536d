"""Tests of kode.data.folders: a folder of real image files (PNG, JPEG, BMP, GIF; grey and RGB)
through the real loading code: scan, split, fingerprint, decoding, normalization, shuffling,
unreadable files."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from kode.data.datasets import dataset_info, dataset_kind, load_dataset
from kode.data.folders import scan_folder
from kode.errors import KodeError
from kode.testing.images import NAMES, write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("images") / "my_images")
    write_image_folder(root, classes=3, per_class=10, size=12)
    return root


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def _pil_rgb(path: str) -> np.ndarray:
    """What `kode predict` gives for a 3-channel model at the file's own size, 0–1."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.float64) / 255.0


def test_a_path_is_a_folder_dataset_and_names_win(folder, tmp_path):
    assert dataset_kind(folder) == "folder" and dataset_kind("Digits") == "builtin"
    assert dataset_kind("tfds:mnist") == "tfds"
    with pytest.raises(KodeError, match="^dataset folder .*nope does not exist$"):
        dataset_kind(str(tmp_path / "nope"))


def test_classes_are_the_sorted_folder_names_and_the_split_is_seeded_per_class(folder):
    scan = scan_folder(folder, validation_split=0.2, seed=0)
    assert scan.class_names == tuple(sorted(NAMES[:3])) == ("one", "two", "zero")
    assert len(scan.train) == 24 and len(scan.test) == 6  # round(10 · 0.2) of each class
    assert [sum(label == k for _, label in scan.test) for k in range(3)] == [2, 2, 2]
    assert all(rel.split(os.sep)[0] == scan.class_names[label]
               for rel, label in scan.train + scan.test)
    assert set(scan.train).isdisjoint(scan.test)
    assert scan_folder(folder, seed=0) == scan
    assert scan_folder(folder, seed=1).test != scan.test
    assert scan.channels == 3 and scan.split == "validation_split 0.2, seed 0"
    info = dataset_info(folder, image_size=16)
    assert (info.name, info.num_classes, info.input_shape) == ("my_images", 3, (16, 16, 3))
    assert (info.train_size, info.test_size, info.class_names) == (24, 6, scan.class_names)


def test_the_fingerprint_covers_names_and_sizes(folder, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    before = scan_folder(copy).sha256
    assert scan_folder(copy).sha256 == before == scan_folder(folder).sha256
    with open(os.path.join(copy, "one", "000.png"), "ab") as fh:
        fh.write(b"\0")  # same names, one size differs
    assert scan_folder(copy).sha256 != before
    os.remove(os.path.join(copy, "one", "000.png"))
    assert scan_folder(copy).sha256 != before


def test_train_and_test_folders_are_used_as_they_are(tmp_path):
    write_image_folder(str(tmp_path / "train"), classes=2, per_class=6)
    write_image_folder(str(tmp_path / "test"), classes=2, per_class=3, start=6)
    scan = scan_folder(str(tmp_path))
    assert scan.split == "test folder" and scan.class_names == ("one", "zero")
    assert len(scan.train) == 12 and len(scan.test) == 6
    assert all(rel.startswith("test" + os.sep) for rel, _ in scan.test)


def test_grey_only_folders_give_one_channel(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=4, grey_every=1)
    assert scan_folder(str(tmp_path)).channels == 1
    _, test, info = load_dataset(str(tmp_path), image_size=12, batch_size=4)
    assert info.input_shape == (12, 12, 1) and _collect(test)[0].shape[1:] == (12, 12, 1)


def test_pixels_and_statistics_are_those_kode_predict_sees(folder):
    """At the files' own size the pipeline's images are PIL's RGB conversion of the files
    (grey repeated), normalized by the train split's per-channel mean and std."""
    _, test, info = load_dataset(folder, image_size=12, batch_size=5)
    scan = scan_folder(folder)
    train = np.stack([_pil_rgb(os.path.join(folder, rel)) for rel, _ in scan.train])
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(info.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(info.std, std, rtol=1e-6)
    x, y = _collect(test)
    expected = np.stack([_pil_rgb(os.path.join(folder, rel)) for rel, _ in scan.test])
    np.testing.assert_allclose(x, (expected - mean) / std, atol=1e-4)
    np.testing.assert_array_equal(y, [label for _, label in scan.test])
    assert info.source["files_sha256"] == scan.sha256 and info.source["skipped"] == []


def test_png_jpeg_bmp_and_gif_are_decoded_and_resized(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=8,
                       formats=("png", "jpg", "bmp", "gif"))
    train, test, info = load_dataset(str(tmp_path), image_size=20, batch_size=32)
    x, y = _collect(train)
    assert x.shape == (12, 20, 20, 3) and np.isfinite(x).all() and x.dtype == np.float32
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6
    assert info.input_shape == (20, 20, 3)
    # The lossless formats decode to PIL's pixels (at their own size: no resampling).
    _, lossless, info = load_dataset(str(tmp_path), image_size=12, batch_size=32)
    scan = scan_folder(str(tmp_path))
    images = _collect(lossless)[0]
    for (rel, _), image in zip(scan.test, images, strict=True):
        if not rel.endswith(".jpg"):
            pixels = image * np.asarray(info.std) + np.asarray(info.mean)
            np.testing.assert_allclose(pixels, _pil_rgb(os.path.join(tmp_path, rel)),
                                       atol=1e-4, err_msg=rel)


def test_train_passes_are_seeded_reshuffled_and_the_same_in_a_second_instance(folder):
    def passes(seed):
        train = load_dataset(folder, image_size=12, batch_size=8, seed=seed)[0]
        it = train.repeat(2)
        x, y = _collect(it)
        return x[:24], y[:24], x[24:], y[24:]

    x1, y1, x2, y2 = passes(0)
    again = passes(0)
    np.testing.assert_array_equal(x1, again[0])
    np.testing.assert_array_equal(x2, again[2])
    assert not np.array_equal(y1, y2) and sorted(y1) == sorted(y2)
    assert not np.array_equal(passes(1)[1], y1)


def _garbage(path):
    with open(path, "wb") as fh:
        fh.write(b"this is not an image at all")


def _truncated(path, source):
    with open(source, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def test_unreadable_images_are_named_or_skipped_and_counted(tmp_path):
    root = str(tmp_path / "data")
    write_image_folder(root, classes=2, per_class=6)
    _truncated(os.path.join(root, "zero", "truncated.png"), os.path.join(root, "zero", "001.png"))
    info = dataset_info(root)  # its header is fine
    assert info.train_size + info.test_size == 13
    with pytest.raises(KodeError, match=r"^cannot read image .*zero/truncated.png: image file "
                                        r"is truncated; .*--skip-bad-images"):
        load_dataset(root, image_size=12)  # the decoder finds the truncated file
    _garbage(os.path.join(root, "one", "garbage.png"))
    with pytest.raises(KodeError, match=r"^cannot read image .*one/garbage.png: not a PNG, "
                                        r"JPEG, BMP or GIF image; .*--skip-bad-images"):
        dataset_info(root)
    scan = scan_folder(root, skip_bad_images=True)  # the header check finds the garbage
    assert scan.skipped == (os.path.join("one", "garbage.png"),)
    train, test, info = load_dataset(root, image_size=12, skip_bad_images=True)
    assert info.source["skipped"] == [os.path.join("one", "garbage.png"),
                                      os.path.join("zero", "truncated.png")]
    assert info.train_size + info.test_size == 12
    assert len(_collect(train)[1]) + len(_collect(test)[1]) == 12


@pytest.mark.parametrize("make, words", [
    (lambda root: None, "has no class folders"),
    (lambda root: (os.makedirs(os.path.join(root, "cat")),
                   write_image_folder(os.path.join(root, "x"), classes=1, per_class=2),
                   open(os.path.join(root, "cat", "notes.txt"), "w").close()),
     "class folder {root}/cat has no images"),
    (lambda root: write_image_folder(root, classes=1, per_class=4),
     "has one class only (zero)"),
    (lambda root: write_image_folder(root, classes=2, per_class=1),
     "too few images to hold out a test split"),
], ids=["empty", "class-without-images", "one-class", "too-few"])
def test_bad_folders_are_one_line_before_any_image_is_decoded(tmp_path, make, words):
    root = str(tmp_path / "data")
    os.makedirs(root)
    make(root)
    for call in (lambda: dataset_info(root), lambda: load_dataset(root)):
        with pytest.raises(KodeError) as err:
            call()
        assert words.format(root=root) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_channel_conversion_is_pillows_bit_for_bit(mode):
    """kode.images.to_channels (folders and kode predict) = Image.convert("L" | "RGB"), with
    the channels known statically and at run time (tf.io.decode_image in a tf.data map)."""
    import tensorflow as tf

    from kode.images import to_channels

    channels = len(mode)
    pixels = np.random.default_rng(channels).integers(0, 256, (7, 9, channels), np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    for target, c in (("L", 1), ("RGB", 3)):
        expected = np.asarray(image.convert(target)).reshape(7, 9, c)
        np.testing.assert_array_equal(to_channels(pixels, c).numpy(), expected)
        unknown = tf.function(lambda x, c=c: to_channels(x, c), input_signature=[
            tf.TensorSpec([None, None, None], tf.uint8)])
        np.testing.assert_array_equal(unknown(pixels).numpy(), expected)
