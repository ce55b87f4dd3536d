"""Datasets as ``tf.data`` pipelines: digits (embedded), MNIST, CIFAR-10/100 and ImageNet
through tensorflow-datasets, and the user's own data: a folder of images
(:mod:`kode.data.folders`), ``tfds:NAME`` (:mod:`kode.data.tfds_named`), numpy arrays
(:mod:`kode.data.arrays`) and ``tf.data.Dataset``s (:mod:`kode.data.streams`)."""

from kode.data.datasets import (
    DatasetInfo,
    dataset_info,
    dataset_names,
    load_dataset,
    preprocess_images,
)

__all__ = ["DatasetInfo", "dataset_info", "dataset_names", "load_dataset", "preprocess_images"]
