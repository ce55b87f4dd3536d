"""Tests of kode.data: the embedded digits set, tfds datasets through the real loading code
(stood in for by ``tfds.testing.mock_data``), and the offline fast failure."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import socket  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from kode.data.datasets import (
    DatasetInfo,
    dataset_info,
    dataset_names,
    load_dataset,
    preprocess_images,
)
from kode.errors import KodeError  # noqa: E402

KNOWN = ["cifar10", "cifar100", "digits", "imagenet2012", "mnist"]


def _collect(ds):
    """All (images, labels) of a batched dataset as numpy arrays, plus the batch sizes."""
    xs, ys, sizes = [], [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
        sizes.append(len(y))
    return np.concatenate(xs), np.concatenate(ys), sizes


def _sklearn_split():
    digits = load_digits()
    return train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )


def _translation_of(aug: np.ndarray, orig: np.ndarray, pad: int, flip: bool):
    """(dy, dx, flipped) such that ``aug`` is ``orig`` zero-padded, cropped (and flipped)."""
    h, w = orig.shape[:2]
    padded = np.pad(orig, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            for flipped in (False, True) if flip else (False,):
                cand = crop[:, ::-1] if flipped else crop
                if np.allclose(cand, aug, atol=1e-6):
                    return dy - pad, dx - pad, flipped
    return None


# --------------------------------------------------------------------------- names, errors


def test_dataset_names():
    assert dataset_names() == KNOWN


@pytest.mark.parametrize("bad", ["cifar11", "", "imagenet"])
def test_unknown_name_lists_known_ones(bad):
    for call in (lambda: load_dataset(bad), lambda: dataset_info(bad)):
        with pytest.raises(KodeError) as err:
            call()
        message = str(err.value)
        assert "unknown dataset" in message
        for name in KNOWN:
            assert name in message
        assert "\n" not in message


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", True])
def test_bad_batch_size(batch_size):
    with pytest.raises(KodeError, match="batch_size"):
        load_dataset("digits", batch_size=batch_size)


def test_manual_dir_only_for_imagenet(tmp_path):
    with pytest.raises(KodeError, match="manual_dir"):
        load_dataset("digits", manual_dir=str(tmp_path))


# --------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_dtypes():
    train, test, info = load_dataset("digits", batch_size=128)
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.num_classes, info.input_shape) == ("digits", 10, (8, 8, 1))
    assert (info.train_size, info.test_size) == (1437, 360)
    assert info.class_names == tuple(str(i) for i in range(10))
    assert len(info.mean) == len(info.std) == 1
    x_train, y_train, sizes = _collect(train)
    x_test, y_test, test_sizes = _collect(test)
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    # Batched without dropping the remainder.
    assert sizes == [128] * 11 + [1437 - 11 * 128]
    assert test_sizes == [128, 128, 104]
    # Every class present in both splits.
    assert set(y_train) == set(range(10)) and set(y_test) == set(range(10))
    assert dataset_info("digits") == info


def test_digits_split_is_the_documented_stratified_split():
    _, x_test_ref, y_train_ref, y_test_ref = _sklearn_split()
    _, test_a, _ = load_dataset("digits", batch_size=50)
    _, test_b, _ = load_dataset("digits", batch_size=77, seed=5)
    _, y_a, _ = _collect(test_a)
    _, y_b, _ = _collect(test_b)
    np.testing.assert_array_equal(y_a, y_b)  # deterministic, not shuffled, seed-independent
    np.testing.assert_array_equal(y_a, y_test_ref)
    train, _, _ = load_dataset("digits")
    _, y_train, _ = _collect(train)
    np.testing.assert_array_equal(np.sort(y_train), np.sort(y_train_ref))
    # Stratified: each class keeps its share (20 % +- one image) in the test split.
    total = np.bincount(np.concatenate([y_train, y_a]), minlength=10)
    assert np.all(np.abs(np.bincount(y_a, minlength=10) - 0.2 * total) <= 1)


def test_digits_normalization_uses_train_statistics():
    x_train_ref, _, _, _ = _sklearn_split()
    train, _, info = load_dataset("digits", batch_size=256)
    pixels = x_train_ref / 16.0
    assert info.mean[0] == pytest.approx(pixels.mean(), rel=1e-9)
    assert info.std[0] == pytest.approx(pixels.std(), rel=1e-9)
    x, _, _ = _collect(train)
    assert abs(float(x.mean())) < 1e-4
    assert float(x.std()) == pytest.approx(1.0, abs=1e-4)


def test_preprocess_images_matches_the_pipeline():
    _, x_test_ref, _, _ = _sklearn_split()
    _, test, info = load_dataset("digits", batch_size=64)
    x_pipe, _, _ = _collect(test)
    mine = preprocess_images(x_test_ref[..., None] / 16.0, info)
    assert mine.dtype == np.float32 and mine.shape == x_pipe.shape
    np.testing.assert_allclose(mine, x_pipe, rtol=0, atol=1e-6)
    # One image without a batch axis works too.
    np.testing.assert_allclose(preprocess_images(x_test_ref[0, ..., None] / 16.0, info),
                               x_pipe[0], rtol=0, atol=1e-6)


def test_preprocess_images_rejects_bad_input():
    info = dataset_info("digits")
    with pytest.raises(KodeError, match="channels"):
        preprocess_images(np.zeros((2, 8, 8, 3)), info)
    with pytest.raises(KodeError, match=r"\[0, 1\]"):
        preprocess_images(np.full((2, 8, 8, 1), 16.0), info)


def test_train_is_shuffled_seeded_and_reshuffled_each_epoch():
    train, _, _ = load_dataset("digits", batch_size=1437, seed=1)
    epoch1 = next(iter(train))[1].numpy()
    epoch2 = next(iter(train))[1].numpy()
    again, _, _ = load_dataset("digits", batch_size=1437, seed=1)
    other, _, _ = load_dataset("digits", batch_size=1437, seed=2)
    _, y_sorted_ref, _, _ = _sklearn_split()
    assert not np.array_equal(epoch1, np.asarray(y_sorted_ref))  # shuffled at all
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    np.testing.assert_array_equal(epoch1, next(iter(again))[1].numpy())  # seeded
    assert not np.array_equal(epoch1, next(iter(other))[1].numpy())


def test_digits_augmentation_is_a_small_translation():
    plain, _, _ = load_dataset("digits", batch_size=500, seed=3)
    aug, _, info = load_dataset("digits", batch_size=500, seed=3, augment=True)
    x_plain, y_plain, _ = _collect(plain)
    x_aug, y_aug, _ = _collect(aug)
    np.testing.assert_array_equal(y_plain, y_aug)  # same order: augmentation only
    assert x_aug.shape == x_plain.shape == (1437,) + info.input_shape
    shifts = [_translation_of(a, p, pad=1, flip=False) for a, p in zip(x_aug, x_plain, strict=True)]
    assert all(s is not None for s in shifts)
    assert sum(not np.allclose(a, p) for a, p in zip(x_aug, x_plain, strict=True)) > 1000
    # Reproducible: the same seed gives the same augmented epoch.
    again, _, _ = load_dataset("digits", batch_size=500, seed=3, augment=True)
    np.testing.assert_array_equal(_collect(again)[0], x_aug)


# --------------------------------------------------------------------------- cifar10 (mock)

N_MOCK = 24


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=N_MOCK):
        yield


def _raw_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = tfds.builder(name).as_dataset(split=split, as_supervised=True)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.stack(xs), np.asarray(ys)


def test_cifar10_shapes_labels_info(mock_tfds):
    train, test, info = load_dataset("cifar10", batch_size=10)
    assert (info.name, info.num_classes, info.input_shape) == ("cifar10", 10, (32, 32, 3))
    assert (info.train_size, info.test_size) == (N_MOCK, N_MOCK)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)
    assert info.class_names[:2] == ("airplane", "automobile") and len(info.class_names) == 10
    for ds in (train, test):
        assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]  # static for Keras
        x, y, sizes = _collect(ds)
        assert x.shape == (N_MOCK, 32, 32, 3) and x.dtype == np.float32
        assert y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
        assert sizes == [10, 10, 4]


def test_cifar10_test_split_is_normalized_not_augmented(mock_tfds):
    _, test, info = load_dataset("cifar10", batch_size=7, augment=True)
    raw_x, raw_y = _raw_split("cifar10", "test")
    x, y, _ = _collect(test)
    np.testing.assert_array_equal(y, raw_y)  # not shuffled
    np.testing.assert_allclose(x, preprocess_images(raw_x / 255.0, info), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_collect(test)[0], x)  # same every epoch


def test_cifar10_augmentation_pads_crops_and_flips(mock_tfds):
    plain, _, _ = load_dataset("cifar10", batch_size=8, augment=False, seed=4)
    aug, _, info = load_dataset("cifar10", batch_size=8, seed=4)  # augmented by default
    x_plain, y_plain, _ = _collect(plain)
    x_aug, y_aug, _ = _collect(aug)
    np.testing.assert_array_equal(y_plain, y_aug)
    assert x_aug.shape == x_plain.shape == (N_MOCK, 32, 32, 3)
    found = [_translation_of(a, p, pad=4, flip=True) for a, p in zip(x_aug, x_plain, strict=True)]
    assert all(f is not None for f in found)
    assert sum(not np.allclose(a, p) for a, p in zip(x_aug, x_plain, strict=True)) >= N_MOCK - 2
    assert {f[2] for f in found} == {False, True}  # both flipped and unflipped images
    assert max(max(abs(f[0]), abs(f[1])) for f in found) > 1  # real shifts, up to 4
    # The plain train split is a permutation of the normalized raw data.
    raw_x, raw_y = _raw_split("cifar10", "train")
    expected = preprocess_images(raw_x / 255.0, info)
    match = [
        [i for i in range(N_MOCK) if np.allclose(expected[i], p, atol=1e-5)] for p in x_plain
    ]
    assert sorted(m[0] for m in match) == list(range(N_MOCK))
    np.testing.assert_array_equal(y_plain, raw_y[[m[0] for m in match]])


def test_imagenet_pipeline_shapes(mock_tfds):
    train, test, info = load_dataset("imagenet2012", batch_size=16)
    assert info.input_shape == (224, 224, 3) and info.num_classes == 1000
    for ds in (train, test):
        x, y, _ = _collect(ds)
        assert x.shape == (N_MOCK, 224, 224, 3) and x.dtype == np.float32
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 1000
        assert np.isfinite(x).all()
    np.testing.assert_array_equal(_collect(test)[0], _collect(test)[0])


# --------------------------------------------------------------------------- offline


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to resolve a host name or open a connection."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_not_prepared_fails_fast_without_network(name, tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(KodeError) as err:
        load_dataset(name, data_dir=str(tmp_path))
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 10, elapsed
    assert "not prepared" in message and f"tfds build {name}" in message
    assert str(tmp_path) in message and "--data-dir" in message and "\n" not in message
    assert no_network == []
    assert not any(tmp_path.iterdir())  # nothing downloaded or written


def test_imagenet_not_prepared_asks_for_manual_files(tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(KodeError) as err:
        load_dataset("imagenet2012", data_dir=str(tmp_path / "data"))
    assert time.monotonic() - start < 10
    assert "not prepared" in str(err.value) and "--manual-dir" in str(err.value)
    assert "tfds build" in str(err.value)
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(KodeError, match="ILSVRC2012_img_train.tar"):
        load_dataset("imagenet2012", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    assert no_network == []


def test_dataset_info_of_unprepared_tfds_dataset_is_offline(tmp_path, no_network):
    start = time.monotonic()
    info = dataset_info("cifar100", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert (info.train_size, info.test_size, info.num_classes) == (50_000, 10_000, 100)
    assert info.class_names[:2] == ("apple", "aquarium_fish") and len(info.class_names) == 100
    assert dataset_info("mnist", data_dir=str(tmp_path)).input_shape == (28, 28, 1)
    assert no_network == []
