"""Gradient modes of an integrator stage: how the backward pass gets the states x_n.

- ``backprop``: autodiff through every step, O(N) stored states.
- ``checkpoint``: store the state every k = ⌈√N⌉ steps; the backward recomputes one segment
  at a time under a tape: exact gradients, O(√N) states.
- ``adjoint`` (Sander et al. 2022): store nothing but the final state; the backward rebuilds
  x_n = reverse_step(x_{n+1}) and takes one vector-Jacobian product per step:

      a = ∂L/∂x_N;  for n = N−1…0:  x_n ← reverse(x_{n+1});  (a, g_θn) ← vjp(step_n, x_n)(a)

  Exact (to rounding) for exactly reversible integrators, approximate otherwise.

This module knows neither the integrator nor the residual functions: it integrates a
:class:`Dynamics` (init / step / reverse_step / output callables). Recomputation runs inside a
``keras.StatelessScope`` that (a) replays the random-generator states each step saw in the
forward, so dropout and stochastic-depth draws repeat exactly, and (b) discards variable
updates, so BatchNorm moving statistics are updated once per training step (by the forward)
while recomputation normalizes with the same batch statistics as the forward did.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

from kode.errors import KodeError

BACKPROP, CHECKPOINT, ADJOINT = "backprop", "checkpoint", "adjoint"
GRADIENT_MODES = (BACKPROP, CHECKPOINT, ADJOINT)


@dataclass(frozen=True)
class Dynamics:
    """A stage seen as a discrete dynamical system on a tuple state (None entries allowed)."""

    init: Callable[[tf.Tensor, tf.Tensor | None], tuple]
    step: Callable[[int, tuple], tuple]
    output: Callable[[tuple], tf.Tensor]
    num_steps: int
    reverse_step: Callable[[int, tuple], tuple] | None = None
    #: non-trainable variables holding random-generator state, replayed on recomputation.
    rng_variables: Sequence[keras.Variable] = ()
    #: forward step (−1: init) whose random draws ``reverse_step(n)`` repeats.
    reverse_replays: Callable[[int], int] = lambda n: n


def check_gradient_mode(mode: str, integrator, num_steps: int | None = None) -> str:
    """Validate ``mode`` for ``integrator`` (and a stage of ``num_steps`` steps)."""
    if mode not in GRADIENT_MODES:
        raise KodeError(
            f"unknown gradient mode '{mode}'; choose one of {', '.join(GRADIENT_MODES)}"
        )
    if mode == ADJOINT and not integrator.reversible:
        raise KodeError(
            f"gradient='adjoint' needs a reversible integrator; '{integrator.name}' "
            f"{integrator.no_reversal_reason}: use gradient='checkpoint'"
        )
    limit = integrator.max_adjoint_steps
    if mode == ADJOINT and num_steps is not None and limit is not None and num_steps > limit:
        raise KodeError(
            f"gradient='adjoint' on a {num_steps}-step {integrator!r} stage would amplify "
            f"rounding beyond 1e-4 (limit {limit} steps): use gradient='checkpoint', fewer "
            "steps per stage, or a gamma closer to 1"
        )
    return mode


def checkpoint_segments(num_steps: int, every: int | None = None) -> list[tuple[int, int]]:
    """[start, end) step ranges of length ⌈√N⌉ (or ``every``)."""
    every = every or max(1, math.ceil(math.sqrt(num_steps)))
    return [(s, min(s + every, num_steps)) for s in range(0, num_steps, every)]


def integrate(dynamics: Dynamics, x, history=None, mode: str = BACKPROP):
    """Run the stage forward; gradients follow ``mode``."""
    if mode == BACKPROP:
        state = dynamics.init(x, history)
        for n in range(dynamics.num_steps):
            state = dynamics.step(n, state)
        return dynamics.output(state)
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # Measured (docs/gradients.md): XLA drops the control dependencies that sequence the
        # rebuilds, so the states pile up again. Keras' jit_compile="auto" picks XLA on GPUs.
        warnings.warn(
            f"gradient='{mode}' is compiled with XLA (jit_compile=True): its memory is not "
            "O(1)/O(√N) under XLA, which reorders the backward's recomputations; compile with "
            "jit_compile=False to keep the memory savings",
            UserWarning, stacklevel=2)
    segments = (
        [(n, n + 1) for n in range(dynamics.num_steps)]
        if mode == ADJOINT
        else checkpoint_segments(dynamics.num_steps)
    )
    return _integrate_with_custom_gradient(dynamics, x, history, mode, segments)


def _tensors(state) -> list:
    return [s for s in state if s is not None]


def _snapshot(variables) -> list:
    return [tf.identity(v.value) for v in variables]


def _replay(dynamics: Dynamics, rng_values, fn):
    """Run ``fn`` with the random generators as they were and without lasting updates."""
    mapping = list(zip(dynamics.rng_variables, rng_values, strict=True))
    with keras.StatelessScope(state_mapping=mapping):
        return fn()


def _zeros_for_none(grads, like) -> list:
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _accumulate(total: list, grads: Sequence) -> None:
    for i, g in enumerate(grads):
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)
        total[i] = g if total[i] is None else total[i] + g


def _integrate_with_custom_gradient(dynamics, x, history, mode, segments):
    inputs = [x] if history is None else [x, history]

    @tf.custom_gradient
    def forward(*inputs):
        hist = inputs[1] if len(inputs) > 1 else None
        # Without stop_recording an outer eager tape would keep every intermediate alive.
        with record.stop_recording():
            rng_init = _snapshot(dynamics.rng_variables)
            state = dynamics.init(inputs[0], hist)
            rng_at, stored = [], {}
            starts = {start for start, _ in segments}
            for n in range(dynamics.num_steps):
                rng_at.append(_snapshot(dynamics.rng_variables))
                if mode == CHECKPOINT and n in starts:
                    stored[n] = state
                state = dynamics.step(n, state)
            out = dynamics.output(state)
        final_state = state

        def grad_fn(*dys, variables=None):
            variables = list(variables or [])
            var_grads = [None] * len(variables)
            with tf.GradientTape() as tape:
                targets = _tensors(final_state)
                tape.watch(targets)
                y = dynamics.output(final_state)
            adjoint = tape.gradient(
                y, targets, output_gradients=dys[0],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            state_out = final_state
            for start, end in reversed(segments):
                # Sequence the rebuild after the previous VJP: at most a few states alive.
                with tf.control_dependencies(adjoint):
                    if mode == ADJOINT:
                        replayed = dynamics.reverse_replays(start)
                        state_in = _replay(
                            dynamics, rng_at[replayed] if replayed >= 0 else rng_init,
                            lambda s=state_out, n=start: dynamics.reverse_step(n, s),
                        )
                        state_in = tuple(
                            None if s is None else tf.stop_gradient(s) for s in state_in
                        )
                    else:
                        state_in = tuple(
                            None if s is None else tf.identity(s) for s in stored[start]
                        )
                with tf.GradientTape() as tape:
                    sources = _tensors(state_in)
                    tape.watch(sources)
                    state = state_in
                    for n in range(start, end):
                        state = _replay(
                            dynamics, rng_at[n], lambda s=state, n=n: dynamics.step(n, s)
                        )
                grads = tape.gradient(_tensors(state), sources + variables,
                                      output_gradients=adjoint)
                adjoint = _zeros_for_none(grads[: len(sources)], sources)
                _accumulate(var_grads, grads[len(sources):])
                state_out = state_in
            with tf.GradientTape() as tape:
                tape.watch(list(inputs))
                state = _replay(dynamics, rng_init, lambda: dynamics.init(inputs[0], hist))
            grads = tape.gradient(_tensors(state), list(inputs) + variables,
                                  output_gradients=adjoint)
            _accumulate(var_grads, grads[len(inputs):])
            var_grads = [
                g if g is not None and v.trainable else None
                for g, v in zip(var_grads, variables, strict=True)
            ]
            return _zeros_for_none(grads[: len(inputs)], inputs), var_grads

        return out, grad_fn

    return forward(*inputs)


def reconstruction_error(dynamics: Dynamics, x, history=None) -> float:
    """max |x_0 − x̂_0| / max |x_0|, x̂_0 rebuilt by N reverse steps from the forward's x_N.

    Runs without lasting updates (BN statistics, generator states) and with every random
    generator replayed from the same state forward and backward.
    """
    if dynamics.reverse_step is None:
        return float("nan")
    rng = _snapshot(dynamics.rng_variables)
    state = _replay(dynamics, rng, lambda: dynamics.init(x, history))
    for n in range(dynamics.num_steps):
        state = _replay(dynamics, rng, lambda s=state, n=n: dynamics.step(n, s))
    for n in reversed(range(dynamics.num_steps)):
        state = _replay(dynamics, rng, lambda s=state, n=n: dynamics.reverse_step(n, s))
    rebuilt = dynamics.output(state)
    return float(tf.reduce_max(tf.abs(rebuilt - x)) / (tf.reduce_max(tf.abs(x)) + 1e-30))


def set_gradient_mode(model: keras.Model, mode: str) -> list[str]:
    """Set ``mode`` on every integrator stage of ``model``; returns the stage names.

    Recompile (``model.compile``) a compiled model so that the next train step is retraced.
    """
    stages = [layer for layer in model._flatten_layers() if hasattr(layer, "dynamics")]
    for stage in stages:
        stage.gradient = mode
    return [stage.name for stage in stages]
