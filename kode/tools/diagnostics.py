"""TensorBoard diagnostics of an integrator network while it trains.

:class:`Diagnostics` writes, once per epoch, to ``<logdir>/diagnostics``:

- ``train/loss``, ``train/accuracy`` (and ``val/…``), ``train/learning_rate``,
  ``train/images_per_second`` (training examples / wall time of the epoch's training steps,
  validation excluded);
- ``lm_k/<stage>/lm_k_<n>`` for every LM step n's k_n (scalar; the stage's (K,) variable
  ``lm_k`` holds them, see :func:`kode.tools.stages.lm_k_steps`) and the histograms
  ``lm_k/all`` and ``lm_k/<stage>``; k_n outside (−1, 1] breaks the LM step's root condition;
- ``residual/<stage>/step_<n>`` = mean over a fixed batch of ‖x_{n+1} − x_n‖₂ / h, and the
  histogram ``residual/<stage>`` over n: the size of the learned vector field along depth.
  An ODE-like stage (Sander et al.) has a field that varies smoothly and stays bounded as
  the depth grows; spikes show where the adjoint's reversal will be least accurate;
- ``gradient_guard/adjoint_gradient_error`` whenever the
  :class:`~kode.tools.guard.GradientGuard` re-checked the adjoint (it puts the error in ``logs``:
  place the guard before this callback).

The residual sizes use ``IntegratorStage.dynamics(training=False)`` (inference BatchNorm, no
random draws, no variable updates) on the stage inputs of a fixed batch, computed the way
:mod:`kode.tools.guard` obtains them: a sub-model from the network input to every stage's input.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from kode.compat import autocast_scope
from kode.tools.stages import integrator_stages, lm_k_steps, stage_inputs


def lm_k_values(model: keras.Model) -> list[tuple[str, float]]:
    """LM's k_n, one ``(label, value)`` per LM step (:func:`kode.tools.stages.lm_k_steps`:
    ``stage1/lm_k_1`` is step 1 of stage1, entry 0 of its (K,) variable ``stage1/lm_k``)."""
    steps = lm_k_steps(model)
    vectors = {id(v): keras.ops.convert_to_numpy(v) for _, v, _, _ in steps}
    return [(label, float(vectors[id(v)][i])) for label, v, i, _ in steps]


def residual_sizes(model: keras.Model, x) -> dict[str, np.ndarray]:
    """Per stage, mean over the batch of ‖x_{n+1} − x_n‖₂ / h for each step n (inference
    mode).     """
    stages = integrator_stages(model)
    if not stages:
        return {}
    sizes = {}
    for stage, (x0, history) in zip(stages, stage_inputs(model, x, stages=stages), strict=True):
        dynamics = stage.dynamics(training=False)
        # Integrator variables (LM's k) may be float32 under a mixed policy: compute in float32
        # outside the layer's autocast scope.
        with _autocast(stage):
            state = dynamics.init(x0, history)
            previous = dynamics.output(state)
            steps = []
            for n in range(dynamics.num_steps):
                state = dynamics.step(n, state)
                current = dynamics.output(state)
                delta = tf.reshape(tf.cast(current - previous, tf.float32),
                                   [tf.shape(current)[0], -1])
                steps.append(float(tf.reduce_mean(tf.norm(delta, axis=1))) / stage.h)
                previous = current
        sizes[stage.name] = np.asarray(steps)
    return sizes


def _autocast(layer):
    """The autocast scope a layer's own ``__call__`` would open (mixed precision)."""
    dtype = layer.compute_dtype if layer.compute_dtype != layer.variable_dtype else None
    return autocast_scope(dtype)


class Diagnostics(keras.callbacks.Callback):
    """Writes the module's diagnostics to ``<logdir>/diagnostics`` at the end of each epoch.

    Args:
        logdir: the run's TensorBoard directory.
        x: a fixed batch of network inputs for the residual sizes, or a dataset of
            ``(x, y)`` batches whose first ``max_examples`` inputs are used. A dataset is read
            at the first epoch end, after validation filled its cache (reading a cached
            dataset partially earlier would discard the cache, with a warning).
        examples_per_epoch: training examples per epoch, for images per second.
        every: write every ``every`` epochs (the first and the last always).
    """

    def __init__(self, logdir: str, x, examples_per_epoch: int, every: int = 1,
                 max_examples: int = 64):
        super().__init__()
        self.logdir = os.path.join(logdir, "diagnostics")
        self._source = x
        self.max_examples = int(max_examples)
        self._x = None
        self.examples_per_epoch = int(examples_per_epoch)
        self.every = max(1, int(every))
        self._writer = None
        self._epoch_start = self._last_batch_end = None
        self._epochs = None

    @property
    def x(self) -> tf.Tensor:
        if self._x is None:
            source = self._source
            if isinstance(source, tf.data.Dataset):
                source = next(iter(source))[0]
            self._x = tf.convert_to_tensor(source)[: self.max_examples]
        return self._x

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.logdir)
        self._epochs = (self.params or {}).get("epochs")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        last = self._epochs is not None and epoch + 1 >= self._epochs
        if not (epoch % self.every == 0 or last):
            return
        end = self._last_batch_end or time.perf_counter()
        seconds = max(end - (self._epoch_start or end), 1e-9)
        step = epoch + 1  # epochs completed, as the TensorBoard callback's epoch axis
        with self._writer.as_default(step=step):
            for key, value in logs.items():
                if np.ndim(value) != 0:
                    continue
                if key == "adjoint_gradient_error":
                    tf.summary.scalar("gradient_guard/adjoint_gradient_error", float(value))
                elif key == "learning_rate":
                    tf.summary.scalar("train/learning_rate", float(value))
                elif key.startswith("val_"):
                    tf.summary.scalar(f"val/{key[4:]}", float(value))
                else:
                    tf.summary.scalar(f"train/{key}", float(value))
            if "learning_rate" not in logs and self.model.optimizer is not None:
                lr = self.model.optimizer.learning_rate
                tf.summary.scalar("train/learning_rate",
                                  float(keras.ops.convert_to_numpy(lr)))
            tf.summary.scalar("train/images_per_second", self.examples_per_epoch / seconds)
            self._write_lm_k()
            for stage, sizes in residual_sizes(self.model, self.x).items():
                for n, size in enumerate(sizes):
                    tf.summary.scalar(f"residual/{stage}/step_{n}", float(size))
                tf.summary.histogram(f"residual/{stage}", sizes)
        self._writer.flush()

    def _write_lm_k(self) -> None:
        ks = lm_k_values(self.model)
        if not ks:
            return
        by_stage: dict[str, list[float]] = {}
        for label, value in ks:
            tf.summary.scalar(f"lm_k/{label}", value)
            by_stage.setdefault(label.split("/")[0], []).append(value)
        tf.summary.histogram("lm_k/all", np.asarray([value for _, value in ks]))
        for stage, stage_values in by_stage.items():
            tf.summary.histogram(f"lm_k/{stage}", np.asarray(stage_values))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
