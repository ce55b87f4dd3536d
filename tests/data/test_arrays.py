"""Tests of numpy arrays (kode.data.arrays) and tf.data.Datasets (kode.data.streams) as a
dataset: registration, split, channels, normalization, bad input, and kode.train /
kode.finetune on them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import kode
from kode.data.arrays import register_arrays
from kode.data.datasets import load_dataset
from kode.errors import KodeError
from kode.training.run_data import dataset_name


def _digits(n=90):
    digits = load_digits()
    keep = digits.target < 3
    x = np.round(digits.images[keep][:n] * 255 / 16).astype(np.uint8)
    return x, digits.target[keep][:n]


def _collect(ds):
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_arrays_are_split_per_class_and_normalized_by_the_train_split():
    x, y = _digits()
    name = register_arrays((x, y))
    assert name.startswith("arrays:") and register_arrays((x, y)) == name
    assert register_arrays((x[::-1], y[::-1])) != name  # other content, other name
    train, test, info = load_dataset(name, batch_size=16, seed=0)
    assert info.input_shape == (8, 8, 1) and info.class_names == ("0", "1", "2")
    held = [round(n * 0.2) for n in np.bincount(y)]  # per class
    assert info.train_size + info.test_size == len(x) and info.test_size == sum(held)
    x_train, y_train = _collect(train)
    assert np.bincount(y_train).tolist() == (np.bincount(y) - held).tolist()
    assert np.bincount(_collect(test)[1]).tolist() == held
    pixels = (x_train * np.asarray(info.std) + np.asarray(info.mean))
    assert abs(pixels.mean() - info.mean[0]) < 1e-6 and abs(x_train.mean()) < 1e-5
    np.testing.assert_allclose(x_train.std(), 1.0, rtol=1e-5)


def test_validation_arrays_are_the_test_split_and_rgba_becomes_rgb():
    x, y = _digits()
    rgba = np.stack([x, x, x, np.full_like(x, 7)], axis=-1)
    name = register_arrays((rgba[:60], y[:60]), (rgba[60:], y[60:]))
    _, test, info = load_dataset(name, batch_size=64, image_size=12)
    images, labels = _collect(test)
    assert info.input_shape == (12, 12, 3) and images.shape == (30, 12, 12, 3)
    np.testing.assert_array_equal(labels, y[60:])
    np.testing.assert_allclose(images[..., 0], images[..., 2], atol=1e-5)  # alpha dropped


@pytest.mark.parametrize("dataset, words", [
    ((np.zeros((4, 8, 8, 5)), np.arange(4)), "images of shape (N, H, W) or (N, H, W, C)"),
    ((np.full((4, 8, 8), 300.0), np.arange(4)), "pixel values in 0-255"),
    ((np.full((4, 8, 8), 0.5), np.arange(4)), "looks scaled to [0, 1]"),
    ((np.zeros((4, 8, 8)), np.arange(3)), "must be 4 integer labels"),
    ((np.zeros((4, 8, 8)), np.zeros(4, int)), "one class only"),
    ((np.zeros((4, 8, 8)), np.array([0, 1, 2, 3])), "too few examples to hold out"),
])
def test_bad_arrays_are_one_line_before_anything_is_written(dataset, words, tmp_path):
    with pytest.raises(KodeError) as err:
        kode.train("resnet20", dataset, model_options={"depth": 8}, epochs=1,
                   logdir=str(tmp_path / "run"), verbose=0)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_tf_data_dataset_of_other_elements_is_one_line(tmp_path):
    with pytest.raises(KodeError, match="^dataset must be a tf.data.Dataset of \\(image, "
                                        "label\\) pairs$"):
        kode.train("resnet20", tf.data.Dataset.range(3), logdir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_tf_data_datasets_split_or_validation_and_train(tmp_path):
    x, y = _digits()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)  # batches are unbatched
    name = dataset_name(ds)
    assert name.startswith("datasets:") and dataset_name(ds) == name
    train, test, info = load_dataset(name, batch_size=16)
    held = [round(n * 0.2) for n in np.bincount(y)]
    assert (info.train_size, info.test_size) == (len(x) - sum(held), sum(held))
    assert np.bincount(_collect(test)[1]).tolist() == held
    # The same split and normalization as the arrays: the same stream, the same positions.
    a_train, a_test, a_info = load_dataset(register_arrays((x, y)), batch_size=16)
    np.testing.assert_allclose(info.mean, a_info.mean, rtol=1e-9)
    np.testing.assert_allclose(_collect(test)[0], _collect(a_test)[0], atol=1e-6)
    result = kode.train("resnet20", tf.data.Dataset.from_tensor_slices((x[:60], y[:60])),
                        validation=tf.data.Dataset.from_tensor_slices((x[60:], y[60:])),
                        model_options={"depth": 8}, epochs=1, logdir=str(tmp_path / "a"),
                        verbose=0)
    assert result.config["dataset"].startswith("datasets:")
    assert result.config["dataset_info"]["test_size"] == 30


def test_train_and_finetune_on_arrays(tmp_path):
    x, y = _digits()
    result = kode.train("resnet20", (x[:60], y[:60]), validation=(x[60:], y[60:]),
                        model_options={"depth": 8}, epochs=1, logdir=str(tmp_path / "a"),
                        verbose=0)
    assert result.model.input_shape == (None, 8, 8, 1)
    assert result.config["dataset"].startswith("arrays:")
    assert result.config["dataset_info"]["source"]["split"] == "validation arrays"
    tuned = kode.finetune(result.model_path, (x, y), refine=2, gradient="checkpoint", epochs=1,
                          logdir=str(tmp_path / "b"), verbose=0)
    assert tuned.config["dataset_info"]["test_size"] == sum(round(n * 0.2)
                                                            for n in np.bincount(y))
