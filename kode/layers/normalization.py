"""Batch normalization on TensorFlow's fused kernel, with Keras' semantics.

Keras 3's ``BatchNormalization`` on the TensorFlow backend computes ``moments`` and then
elementwise ops; it never calls TensorFlow's fused kernel (``FusedBatchNormV3``), which does
the same work in one pass forward and one backward. :class:`BatchNormalization` here is Keras'
layer (same constructor, config, variables, ``training``/``trainable`` semantics) that runs
the fused kernel when it can:

- training:  y = γ (x − μ_B) / √(σ²_B + ε) + β with the batch statistics, and the moving
  statistics updated as Keras does, m ← m·momentum + μ_B (1 − momentum), v likewise with the
  *biased* batch variance σ²_B (the kernel returns the Bessel-corrected one, n/(n−1)·σ²_B:
  it is scaled back);
- inference (``training`` false, or ``trainable=False`` as in Keras): the same formula with the
  moving statistics.

The fused path needs the TensorFlow backend, a 4-D input with the channel axis last or first,
float32/float16/bfloat16 input (statistics and γ, β stay float32), no mask, no renorm and
``synchronized=False``; anything else runs Keras' own code. Synchronized moments (sums
all-reduced over the replicas) go through :func:`kode.gradients.once_per_step`: when an
adjoint or checkpointed stage recomputes a step in its backward, the layer reuses the sums
the forward all-reduced (no second collective, whose ordering against the optimizer's
all-reduce differs between replica threads) with the all-reduce's gradient attached.
"""

from __future__ import annotations

import keras
from keras import ops

from kode.gradients import once_per_step

_PACKAGE = "kode"
_FUSED_DTYPES = ("float32", "float16", "bfloat16")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel when possible.

    y = γ (x − μ) / √(σ² + ε) + β, (μ, σ²) the batch's biased moments in training and the
    moving averages in inference. Arguments, variables and config are Keras' (a file saved
    with either layer loads into the other).
    """

    def _data_format(self, inputs) -> str | None:
        """"NHWC"/"NCHW" when the fused kernel applies to ``inputs``, else None."""
        if keras.backend.backend() != "tensorflow" or self.renorm or self.synchronized:
            return None
        if len(inputs.shape) != 4:
            return None
        if keras.backend.standardize_dtype(inputs.dtype) not in _FUSED_DTYPES:
            return None
        axis = self.axis % 4
        return {3: "NHWC", 1: "NCHW"}.get(axis)

    def call(self, inputs, training=None, mask=None):
        data_format = None if mask is not None else self._data_format(inputs)
        if data_format is None:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = inputs.shape[self.axis]
        gamma = self.gamma.value if self.scale else tf.ones((channels,), "float32")
        beta = self.beta.value if self.center else tf.zeros((channels,), "float32")
        gamma, beta = tf.cast(gamma, "float32"), tf.cast(beta, "float32")
        if training and self.trainable:
            outputs, mean, corrected = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format=data_format,
                is_training=True,
            )
            shape = tf.shape(inputs)
            count = tf.cast(tf.size(inputs) // shape[self.axis], "float32")
            # The kernel's variance is Bessel-corrected; Keras averages the biased one.
            variance = corrected * ((count - 1.0) / count)
            momentum = self.momentum
            # The kernel's statistics are float32; the moving ones follow the variable dtype
            # (float16 under a per-layer float16 policy).
            mean = tf.cast(mean, self.moving_mean.dtype)
            variance = tf.cast(variance, self.moving_variance.dtype)
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta,
                mean=tf.cast(self.moving_mean.value, "float32"),
                variance=tf.cast(self.moving_variance.value, "float32"),
                epsilon=self.epsilon, data_format=data_format, is_training=False,
            )
        return ops.cast(outputs, self.compute_dtype)

    def _moments(self, inputs, mask):
        if not self.synchronized or mask is not None:
            return super()._moments(inputs, mask)
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None:  # cross-replica context: Keras computes local moments
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        local = [tf.reduce_sum(inputs, axes, keepdims=True),
                 tf.reduce_sum(tf.square(inputs), axes, keepdims=True),
                 tf.reduce_sum(tf.ones_like(inputs), axes, keepdims=True)]

        def all_reduce():
            # Three all-reduces, as Keras issues them.
            return [context.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in local]

        def replay(recorded):
            return [_recorded_sum(context, t, r) for t, r in zip(local, recorded, strict=True)]

        total, squares, count = once_per_step(self, all_reduce, replay)
        # Keras' synchronized moments: var = E(x²) − E(x)², clipped at 0.
        mean = tf.math.divide_no_nan(total, count)
        variance = tf.maximum(tf.math.divide_no_nan(squares, count) - tf.square(mean), 0.0)
        return tf.squeeze(mean, axes), tf.squeeze(variance, axes)


def _recorded_sum(context, local, recorded):
    """The forward's all-reduced ``recorded`` in place of all_reduce(``local``), with the
    all-reduce's gradient (the all-reduced cotangent)."""
    import tensorflow as tf

    @tf.custom_gradient
    def replayed(x):
        del x

        def grad(dy):
            return context.all_reduce(tf.distribute.ReduceOp.SUM, dy)

        return tf.identity(recorded), grad

    return replayed(local)
