"""``kode check-gradients``: the gradient guard on a zoo model and one batch of a dataset."""

from __future__ import annotations

from kode.data.datasets import load_dataset
from kode.tools.guard import GradientReport, check_gradients


def check_zoo_gradients(model_name: str, dataset: str = "digits", *, batch_size: int = 32,
                        data_dir: str | None = None, weights: str | None = None,
                        model_options: dict | None = None) -> GradientReport:
    """Build ``model_name`` for ``dataset`` (with ``weights``, if given) and compare its
    adjoint gradients with backprop's on the first training batch, stage by stage
    (:func:`kode.tools.guard.check_gradients`)."""
    import zoo

    zoo.get_entry(model_name)  # an unknown name fails before any data is read
    train_ds, _, info = load_dataset(dataset, batch_size=batch_size, data_dir=data_dir)
    model = zoo.create_model(model_name, input_shape=info.input_shape,
                             classes=info.num_classes, weights=weights,
                             **(model_options or {}))
    x, y = next(iter(train_ds))
    return check_gradients(model, x, y)
