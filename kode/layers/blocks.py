"""Residual functions f_n (pre-activation, no bias) and the transition's projection P.

Each is a Keras layer mapping x ↦ f(x); the integrator adds x back in its own way.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from kode.layers.normalization import BatchNormalization
from kode.layers.tracking import TrackedChildren

_PACKAGE = "kode"


def _conv(filters: int, kernel: int, stride: int = 1, groups: int = 1, name: str = "conv",
          dtype=None):
    return layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        groups=groups,
        use_bias=False,
        # He-normal with fan-out, as the reference ResNet code initializes convolutions.
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
        name=name,
        dtype=dtype,
    )


def _bn(name: str, zero_gamma: bool = False, dtype=None):
    # Keras' BatchNormalization on TensorFlow's fused kernel (kode/normalization.py).
    return BatchNormalization(
        momentum=0.9, epsilon=1e-5, gamma_initializer="zeros" if zero_gamma else "ones", name=name,
        dtype=dtype,
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BasicBlock(TrackedChildren, layers.Layer):
    """Pre-activation basic block: f(x) = conv3×3(ReLU(BN(conv3×3(ReLU(BN(x)))))).

    ``zero_init`` zeroes the last convolution (a pre-activation block has no BN after it to
    zero, as Goyal et al. do post-activation): the stage then starts as the identity map.
    """

    def __init__(self, filters: int, stride: int = 1, zero_init: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride, self.zero_init = int(filters), int(stride), bool(zero_init)
        dtype = self.dtype_policy  # sublayers follow this layer's policy (float16, mixed…)
        self.bn1 = _bn("bn1", dtype=dtype)
        self.conv1 = _conv(self.filters, 3, self.stride, name="conv1", dtype=dtype)
        self.bn2 = _bn("bn2", dtype=dtype)
        self.conv2 = _conv(self.filters, 3, name="conv2", dtype=dtype)
        if self.zero_init:
            self.conv2.kernel_initializer = keras.initializers.Zeros()

    def build(self, input_shape):
        self.bn1.build(input_shape)
        self.conv1.build(input_shape)
        mid = self.conv1.compute_output_shape(input_shape)
        self.bn2.build(mid)
        self.conv2.build(mid)

    def call(self, x, training=None):
        y = self.conv1(ops.relu(self.bn1(x, training=training)))
        return self.conv2(ops.relu(self.bn2(y, training=training)))

    def compute_output_shape(self, input_shape):
        return self.conv2.compute_output_shape(self.conv1.compute_output_shape(input_shape))

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "stride": self.stride,
            "zero_init": self.zero_init,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Bottleneck(TrackedChildren, layers.Layer):
    """Pre-activation bottleneck: BN-ReLU-1×1(w) → BN-ReLU-3×3(w, stride, groups) →
    BN-ReLU-1×1(out). ``groups > 1`` gives the ResNeXt block (cardinality = groups)."""

    def __init__(
        self,
        width: int,
        filters: int,
        stride: int = 1,
        groups: int = 1,
        zero_init: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width, self.filters = int(width), int(filters)
        self.stride, self.groups, self.zero_init = int(stride), int(groups), bool(zero_init)
        dtype = self.dtype_policy
        self.bn1 = _bn("bn1", dtype=dtype)
        self.conv1 = _conv(self.width, 1, name="conv1", dtype=dtype)
        self.bn2 = _bn("bn2", dtype=dtype)
        self.conv2 = _conv(self.width, 3, self.stride, self.groups, name="conv2", dtype=dtype)
        self.bn3 = _bn("bn3", dtype=dtype)
        self.conv3 = _conv(self.filters, 1, name="conv3", dtype=dtype)
        if self.zero_init:
            self.conv3.kernel_initializer = keras.initializers.Zeros()

    def build(self, input_shape):
        shape = input_shape
        for bn, conv in ((self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)):
            bn.build(shape)
            conv.build(shape)
            shape = conv.compute_output_shape(shape)

    def call(self, x, training=None):
        for bn, conv in ((self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)):
            x = conv(ops.relu(bn(x, training=training)))
        return x

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for conv in (self.conv1, self.conv2, self.conv3):
            shape = conv.compute_output_shape(shape)
        return shape

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "filters": self.filters,
            "stride": self.stride,
            "groups": self.groups,
            "zero_init": self.zero_init,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Projection(TrackedChildren, layers.Layer):
    """The transition's shortcut P(x) = conv1×1(ReLU(BN(x))), stride s, no bias, own BN."""

    def __init__(self, filters: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride = int(filters), int(stride)
        self.bn = _bn("bn", dtype=self.dtype_policy)
        self.conv = _conv(self.filters, 1, self.stride, name="conv", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.bn.build(input_shape)
        self.conv.build(input_shape)

    def call(self, x, training=None):
        return self.conv(ops.relu(self.bn(x, training=training)))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StochasticDepth(TrackedChildren, layers.Layer):
    """LM stochastic depth on a residual function: f̃(x) = η f(x), η ~ Bernoulli(p) drawn once
    per batch in training; at inference f̃(x) = p f(x) (the expectation, Lu et al.).
    """

    def __init__(self, residual_function: layers.Layer, survival_probability: float,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        p = float(survival_probability)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"survival_probability must be in (0, 1], got {p}")
        self.residual_function = residual_function
        self.survival_probability = p
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if not self.residual_function.built:
            self.residual_function.build(input_shape)

    def call(self, x, training=None):
        # In this layer's compute dtype even if the wrapped function has another policy.
        fx = ops.cast(self.residual_function(x, training=training), self.compute_dtype)
        if not training:
            return self.survival_probability * fx
        draw = keras.random.uniform((), seed=self.seed_generator)
        keep = ops.cast(draw < self.survival_probability, fx.dtype)
        return keep * fx

    def compute_output_shape(self, input_shape):
        return self.residual_function.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "residual_function": keras.saving.serialize_keras_object(self.residual_function),
            "survival_probability": self.survival_probability,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["residual_function"] = keras.saving.deserialize_keras_object(
            config["residual_function"]
        )
        return cls(**config)
