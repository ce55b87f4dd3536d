"""The data of a run: which keywords reach :func:`~kode.data.load_dataset` for a folder of
images or a tfds:NAME dataset, a folder's default image size, and what of the data a resumed
run must find unchanged (:func:`data_fingerprint`)."""

from __future__ import annotations

import tensorflow as tf

from kode.data.datasets import DatasetInfo, dataset_kind, load_dataset
from kode.errors import KodeError


def dataset_name(dataset: object, validation: object = None) -> str:
    """The name a run's settings carry for ``dataset``: a built-in name, folder or tfds:NAME
    as it is; an ``(images, labels)`` pair of numpy arrays (and its ``validation`` pair)
    registered by :func:`kode.data.arrays.register_arrays`; a ``tf.data.Dataset`` (and its
    ``validation`` dataset) by :func:`kode.data.streams.register_datasets`."""
    from kode.data.arrays import is_arrays, register_arrays
    from kode.data.streams import register_datasets

    if isinstance(dataset, tf.data.Dataset):
        return register_datasets(dataset, validation)
    if is_arrays(dataset):
        return register_arrays(dataset, validation)
    if validation is not None:
        raise KodeError("validation= goes with dataset=(images, labels) arrays; a folder's "
                        "test split is its test/ folder or validation_split")
    return dataset


def data_fingerprint(info: DatasetInfo) -> dict:
    """What of a folder or tfds:NAME dataset must be unchanged for a run to resume: its files
    (hash of sorted relative paths and sizes), split, skipped files and image shape (nothing
    for the built-in datasets, so their older checkpoints still match)."""
    source = getattr(info, "source", None)  # kode tune's build-only trials have a namespace
    if source is None:
        return {}
    source = {k: v for k, v in source.items() if k not in ("folder", "data_dir")}
    return {"dataset_files": {**source, "input_shape": list(info.input_shape)}}


class RunData:
    """The data steps :class:`~kode.training.TrainingPipeline` (and fine-tuning, tuning)
    share; needs ``self.settings`` (:class:`~kode.training.settings.TrainSettings`)."""

    def default_image_size(self) -> int:
        """A folder's image side when ``image_size`` is not set: the zoo model's layout's
        (32 for the CIFAR layout, 224 for the ImageNet layout and keras.applications)."""
        import zoo
        from zoo.builder import DEFAULT_INPUT_SHAPE

        defaults = zoo.get_entry(self.settings.model).defaults
        if "layout" in defaults:
            return DEFAULT_INPUT_SHAPE[defaults["layout"]][0]
        return DEFAULT_INPUT_SHAPE["imagenet"][0] if "arch" in defaults else 32

    def data_options(self) -> dict:
        """The keywords of :func:`~kode.data.load_dataset` for a folder or tfds:NAME dataset
        (none for the built-in ones); a folder's image size defaults to
        :meth:`default_image_size`, recorded in the settings."""
        s = self.settings
        kind = dataset_kind(s.dataset)
        if kind == "builtin":
            return {}
        if kind == "folder" and s.image_size is None:
            s.image_size = self.default_image_size()
        return {"image_size": s.image_size, "validation_split": s.validation_split,
                "skip_bad_images": s.skip_bad_images}

    def load_dataset(self, cache: bool = True
                     ) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
        """``(train, test, info)`` of the run's dataset: a new instance each call."""
        s = self.settings
        return load_dataset(
            s.dataset, batch_size=s.batch_size, augment=s.augment, data_dir=s.data_dir,
            manual_dir=s.manual_dir, seed=s.seed, cache=cache, **self.data_options(),
        )
