"""Datasets as ``tf.data`` pipelines: digits (embedded), MNIST, CIFAR-10/100 and ImageNet
through tensorflow-datasets."""

from kode.data.datasets import (
    DatasetInfo,
    dataset_info,
    dataset_names,
    load_dataset,
    preprocess_images,
)

__all__ = ["DatasetInfo", "dataset_info", "dataset_names", "load_dataset", "preprocess_images"]
