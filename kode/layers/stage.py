"""The integrator stage (N residual steps on a fixed-shape state) and the transition block.

The stage only knows the :class:`~kode.integrators.Integrator` interface: which scheme it runs
is data (its ``integrator`` argument), so a new scheme is a new integrator class, not an edit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from kode.compat import all_layers
from kode.errors import KodeError
from kode.gradients import (
    BACKPROP,
    Dynamics,
    check_gradient_mode,
    check_mode,
    evaluate,
    integrate,
)
from kode.integrators import EXACT, Integrator, get_integrator, serialize_integrator
from kode.layers.segment import Recomputable, random_state_variables
from kode.layers.tracking import TrackedChildren

_PACKAGE = "kode"


def resolve_step_size(step_size: float | str, num_steps: int, horizon: float = 1.0) -> float:
    """h = step_size, or h = T/N for ``step_size="ode"`` (Sander et al.'s ODE scaling).

    Both ``step_size`` and the horizon T must be finite and positive (h = 0, inf or NaN would
    train a network that silently computes nothing useful).
    """
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Real) \
            or not (math.isfinite(horizon) and horizon > 0):
        raise KodeError(f"horizon must be a finite positive number, got {horizon!r}")
    if step_size == "ode":
        return float(horizon) / max(num_steps, 1)
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) \
            or not (math.isfinite(step_size) and step_size > 0):
        shown = f"'{step_size}'" if isinstance(step_size, str) else f"{step_size!r}"
        raise KodeError(f"step_size must be a finite positive number or 'ode', got {shown}")
    return float(step_size)


def _cast(x, dtype):
    """x in ``dtype`` (x itself when it is already: no op in the graph); None stays None."""
    dtype = keras.backend.standardize_dtype(dtype)
    if x is None or keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return keras.ops.cast(x, dtype)


def _split_inputs(inputs):
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 2:
            raise ValueError("a stage takes x or [x, history]")
        return inputs[0], inputs[1]
    return inputs, None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class IntegratorStage(TrackedChildren, layers.Layer):
    """N residual functions f_0…f_{N−1} integrated by one integrator with step size h.

    Input: x, or [x, x_prev] when the integrator uses a history (LM after a transition).
    Output: x_N (same shape as x). ``gradient`` chooses how training differentiates the
    stage: "backprop", "checkpoint" (O(√N) states) or "adjoint" (O(1) states, rebuilt by
    the integrator's reverse step; see :mod:`kode.gradients`).

    Precision: the residual stream (the integrator's whole state: x, LM's history, momentum's
    velocity, reversible Heun's second copy, RevNet's halves) is carried in
    :attr:`stream_dtype`, the policy's variable dtype: float32 under ``mixed_bfloat16`` and
    ``mixed_float16`` (float64 for an integrator that declares it needs more: the exact
    reversals, momentum, reversible Heun and RevNet).
    Each f_n runs in the compute dtype on the state cast down, its output is cast up before
    the update, so every integrator's arithmetic, forward and reverse, happens in the stream's
    dtype: an exact reversal rebuilds the state to that dtype's rounding, and casting it down
    gives f_n the very low-precision input the forward gave it. Input and
    output stay in the compute dtype (the Keras contract between layers; transitions, stem and
    head follow the policy), so the wider stream stays within a stage, and saved models,
    exported signatures and weights are the same as before.
    """

    def __init__(
        self,
        residual_functions: Sequence[layers.Layer],
        integrator: str | dict | Integrator = "euler",
        step_size: float | str = 1.0,
        horizon: float = 1.0,
        gradient: str = BACKPROP,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.residual_functions = list(residual_functions)
        if not self.residual_functions:
            raise ValueError("a stage needs at least one residual function")
        self.integrator = get_integrator(integrator)
        self.num_steps = self.integrator.num_steps(len(self.residual_functions))
        if self.num_steps < 1:
            raise ValueError(
                f"integrator '{self.integrator.name}' needs at least "
                f"{len(self.residual_functions) - self.num_steps + 1} residual functions per stage"
            )
        self.step_size_spec = step_size
        self.horizon = float(horizon)
        self.h = resolve_step_size(step_size, self.num_steps, horizon)
        self.gradient = gradient
        self.integrator_variables: list = []

    @property
    def gradient(self) -> str:
        return self._gradient

    @gradient.setter
    def gradient(self, mode: str) -> None:
        # Takes effect for the next traced train step (recompile a compiled model).
        self._gradient = check_gradient_mode(mode, self.integrator, self.num_steps)

    def build(self, input_shape):
        has_history = isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        )
        x_shape = tuple(input_shape[0]) if has_history else tuple(input_shape)
        # The shape each residual function sees: the state's, or a part of it (RevNet's halves).
        f_shape = self.integrator.residual_shape(x_shape)
        for f in self.residual_functions:
            if not f.built:
                f.build(f_shape)
            out = tuple(f.compute_output_shape(f_shape))
            if out[1:] != f_shape[1:]:
                raise ValueError(
                    f"residual function '{f.name}' maps shape {f_shape[1:]} to {out[1:]}: "
                    "a stage's residual functions must keep the state's shape"
                )
        self.integrator_variables = self.integrator.create_variables(
            self, self.num_steps, has_history
        )

    def load_own_variables(self, store):
        """Keras' loading, plus the layout of ``.keras`` files written before LM's k_n became
        one vector per stage: K scalar variables ``lm_k_<n>`` (entries "0"…"K−1", in step
        order) are stacked into the stage's (K,) vector, so those files keep their k_n and
        predictions. Any other mismatch is left to Keras' own error."""
        own = self._trainable_variables + self._non_trainable_variables
        keys = list(store.keys())
        if len(own) == 1 and len(own[0].shape) == 1 and len(keys) == own[0].shape[0]:
            values = [np.asarray(store[str(i)]) for i in range(len(keys))]
            if all(v.shape == () for v in values):
                store = {"0": np.stack(values)}
        super().load_own_variables(store)

    @property
    def stream_dtype(self) -> str:
        """The dtype of the residual stream: the compute dtype under a plain policy (float32,
        float16…); under a mixed one (compute dtype narrower than the variables') the
        variables' float32, or the wider dtype the integrator asks for
        (``Integrator.mixed_precision_stream``: the exact reversals)."""
        compute, variable = self.compute_dtype, self.variable_dtype
        if compute == variable or not keras.backend.is_float_dtype(variable):
            return compute
        return self.integrator.mixed_precision_stream or variable

    def residual_callables(self, training=None) -> list:
        """The residual functions as x ↦ f_n(x) callables with ``training`` bound (through
        :func:`kode.gradients.evaluate`, which may reuse an adjoint's reverse evaluation).

        f_n runs on x cast to the stage's compute dtype (bfloat16, float16) and comes back in
        x's dtype (the stream's, float32 under a mixed policy), whatever the dtype policy a
        residual function was built with.
        """
        compute = self.compute_dtype

        def bind(f):
            def fn(x):
                return _cast(f(_cast(x, compute), training=training), x.dtype)

            return lambda x: evaluate(fn, x)

        return [bind(f) for f in self.residual_functions]

    def dynamics(self, training=None) -> Dynamics:
        """This stage as init/step/reverse callables for :func:`kode.gradients.integrate`.

        ``init`` casts the input (and history) up to :attr:`stream_dtype`, ``output`` casts
        x_N down to the compute dtype: every state in between, the ones the checkpoint mode
        stores and the adjoint rebuilds included, is in the stream dtype."""
        fns = self.residual_callables(training)
        integrator, h, params = self.integrator, self.h, self.integrator_variables
        stream, compute = self.stream_dtype, self.compute_dtype
        return Dynamics(
            init=lambda x, history: integrator.init_state(
                _cast(x, stream), _cast(history, stream), fns, h),
            step=lambda n, state: integrator.step(n, state, fns, h, params),
            output=lambda state: _cast(integrator.output(state), compute),
            num_steps=self.num_steps,
            reverse_step=(lambda n, state: integrator.reverse_step(n, state, fns, h, params))
            if integrator.reversible else None,
            rng_variables=random_state_variables(self),
            reverse_replays=integrator.reverse_replays,
            reuse_reverse_evaluations=integrator.reversal == EXACT,
        )

    def call(self, inputs, training=None):
        x, history = _split_inputs(inputs)
        mode = self.gradient if training else BACKPROP
        return integrate(self.dynamics(training), x, history, mode)

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "residual_functions": [
                keras.saving.serialize_keras_object(f) for f in self.residual_functions
            ],
            "integrator": serialize_integrator(self.integrator),
            "step_size": self.step_size_spec,
            "horizon": self.horizon,
            "gradient": self.gradient,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["residual_functions"] = [
            keras.saving.deserialize_keras_object(f) for f in config["residual_functions"]
        ]
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TransitionBlock(Recomputable, TrackedChildren, layers.Layer):
    """Shape-changing block between stages: u_{n+1} = P(u_n) + f(u_n), not invertible.

    Returns ``(u_{n+1}, P(u_n))``: LM's next step takes u_{n−1} := P(u_n) (Lu et al.);
    other schemes ignore the second output. (A tuple: Keras' data pipeline, which a fit step
    on this layer alone goes through, takes tuples but not lists as nested outputs.)
    ``gradient`` other than "backprop": the backward recomputes the block from u_n (which the
    previous stage keeps anyway) instead of storing its activations.
    """

    def __init__(self, residual_function: layers.Layer, projection: layers.Layer,
                 gradient: str = BACKPROP, **kwargs):
        super().__init__(**kwargs)
        self.residual_function = residual_function
        self.projection = projection
        self.gradient = check_mode(gradient)

    def build(self, input_shape):
        if not self.residual_function.built:
            self.residual_function.build(input_shape)
        if not self.projection.built:
            self.projection.build(input_shape)

    def call(self, x, training=None):
        def block(u):
            # Both branches in this layer's compute dtype, whatever the sublayers' policies.
            shortcut = keras.ops.cast(self.projection(u, training=training), self.compute_dtype)
            fu = keras.ops.cast(self.residual_function(u, training=training), self.compute_dtype)
            return (shortcut + fu, shortcut)

        return self.recomputed(block, x, training)

    def compute_output_shape(self, input_shape):
        shape = tuple(self.projection.compute_output_shape(input_shape))
        return (shape, shape)

    def get_config(self):
        return {
            **super().get_config(),
            "residual_function": keras.saving.serialize_keras_object(self.residual_function),
            "projection": keras.saving.serialize_keras_object(self.projection),
            "gradient": self.gradient,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("residual_function", "projection"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def integrator_stages(model: keras.layers.Layer) -> list[IntegratorStage]:
    """The integrator stages inside ``model`` (nested models included), in layer order."""
    return [layer for layer in all_layers(model) if isinstance(layer, IntegratorStage)]


def recomputable_layers(model: keras.layers.Layer) -> list[Recomputable]:
    """The layers outside the stages that can recompute in the backward (transitions, a
    ported model's stem, shape-changing segments and head), in layer order."""
    return [layer for layer in all_layers(model) if isinstance(layer, Recomputable)]


def set_gradient_mode(model: keras.layers.Layer, mode: str, recompute: bool = True) -> list[str]:
    """Set ``mode`` on every integrator stage of ``model``; returns the stage names.

    With ``recompute`` (the default) the layers outside the stages (:func:`recomputable_layers`)
    take the same mode, so that in "checkpoint" and "adjoint" they keep only their inputs and
    recompute their activations in the backward; ``recompute=False`` lets them backpropagate.
    Recompile (``model.compile``) a compiled model so that the next train step is retraced.
    """
    check_mode(mode)
    stages = integrator_stages(model)
    for stage in stages:
        stage.gradient = mode
    for layer in recomputable_layers(model):
        layer.gradient = mode if recompute else BACKPROP
    return [stage.name for stage in stages]
