"""Tests of ``tfds:NAME``: a tiny image-classification dataset prepared for real (a tfds
builder defined here, built offline into a temporary data_dir) through the real loading code;
an unprepared or unknown name is one line."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kode.data.datasets import check_prepared, dataset_info, dataset_label, load_dataset
from kode.errors import KodeError

NAMES = ["circle", "square", "triangle"]


class KodeTinyShapes(tfds.core.GeneratorBasedBuilder):
    """12 RGB images of 6x6 per split, label k drawn as brightness k."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 6, 3)),
                "label": tfds.features.ClassLabel(names=NAMES),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12, 0), "test": self._generate_examples(6, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            label = i % 3
            image = rng.integers(0, 60, (6, 6, 3)) + 80 * label
            yield i, {"image": image.astype(np.uint8), "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds"))
    KodeTinyShapes(data_dir=root).download_and_prepare()
    return root


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_a_prepared_tfds_dataset_by_name(data_dir):
    info = dataset_info("tfds:kode_tiny_shapes", data_dir)
    assert info.class_names == tuple(NAMES) and info.num_classes == 3
    assert (info.input_shape, info.train_size, info.test_size) == ((6, 6, 3), 12, 6)
    assert dataset_label("tfds:kode_tiny_shapes") == "tfds-kode_tiny_shapes"
    train, test, info = load_dataset("tfds:kode_tiny_shapes", data_dir=data_dir, batch_size=5)
    x, y = _collect(test)
    builder = tfds.builder("kode_tiny_shapes", data_dir=data_dir)
    raw_test = [e["label"] for e in tfds.as_numpy(builder.as_dataset(split="test"))]
    assert x.shape == (6, 6, 6, 3) and y.tolist() == raw_test  # the test split in its order
    assert sorted(raw_test) == [0, 0, 1, 1, 2, 2]
    raw = np.stack([e["image"] for e in tfds.as_numpy(builder.as_dataset(split="train"))])
    np.testing.assert_allclose(info.mean, (raw / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(info.std, (raw / 255.0).std(axis=(0, 1, 2)), rtol=1e-6)
    assert np.sort(_collect(train)[1]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    resized = load_dataset("tfds:kode_tiny_shapes", data_dir=data_dir, image_size=8)[2]
    assert resized.input_shape == (8, 8, 3)


def test_unprepared_and_unknown_names_are_one_line(tmp_path):
    with pytest.raises(KodeError, match=r"^dataset 'mnist' is not prepared in .*'tfds build "
                                        r"mnist --data_dir DIR' and pass --data-dir DIR$"):
        check_prepared("tfds:mnist", str(tmp_path))
    with pytest.raises(KodeError, match="^unknown tfds dataset 'no_such_set'"):
        dataset_info("tfds:no_such_set", str(tmp_path))
    with pytest.raises(KodeError, match="^tfds: needs a dataset name"):
        dataset_info("tfds:", str(tmp_path))


def test_kode_train_on_a_tfds_dataset_by_name(data_dir, tmp_path):
    import json

    import kode

    result = kode.train("resnet20", "tfds:kode_tiny_shapes", data_dir=data_dir,
                        image_size=8, model_options={"depth": 8}, epochs=1,
                        logdir=str(tmp_path / "run"),
                        verbose=0)
    assert result.model.input_shape == (None, 8, 8, 3)
    meta = json.loads((tmp_path / "run" / "kode.json").read_text())
    assert meta["class_names"] == NAMES and meta["dataset"] == "tfds:kode_tiny_shapes"
    assert meta["training"]["dataset_info"]["source"]["tfds"] == "kode_tiny_shapes"
