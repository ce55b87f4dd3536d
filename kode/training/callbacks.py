"""Callbacks every training run uses: learning-rate logging and the divergence stop."""

from __future__ import annotations

import math

import keras

from kode.errors import KodeError


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the epoch's learning rate to the logs (so TensorBoard plots it)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


class DivergenceStop(keras.callbacks.Callback):
    """Stops training at the first non-finite loss (a diverged run would otherwise train to
    the end and save, export and report a model of NaNs)."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise KodeError(
                f"training diverged: loss is {float(loss)} at epoch {self.epoch + 1}, step "
                f"{batch + 1}; no model was saved or exported (try a smaller --lr)"
            )
