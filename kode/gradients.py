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
while recomputation normalizes with the batch statistics of the same states as the forward.

The same machinery serves the layers outside the stages (stem, shape-changing blocks, head):
:func:`recompute` runs any ``fn(x)`` as a one-step checkpointed system, so that only x is kept
and the activations are rebuilt, with the same random draws and no second statistics update,
in the backward.

Two generic hooks, for callers that opt in:

- :func:`once_per_step`: a value computed inside the forward of step n (e.g. synchronized
  BatchNorm's all-reduced moments) is recorded and handed back, not recomputed, when the
  backward recomputes step n; a collective is then issued once per train step, as in backprop.
- :func:`evaluate`: the stage routes its residual-function calls through it. When
  ``Dynamics.reuse_reverse_evaluations`` (exact reversals: ``reverse_step(n)`` evaluates f at
  the very states forward step ``reverse_replays(n)`` evaluated it at), the reverse step's
  evaluations are taped, and the vector-Jacobian product of that forward step differentiates
  them instead of evaluating the functions again: one evaluation per reverse step.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf

from kode.compat import in_xla_context, stop_recording
from kode.errors import KodeError

BACKPROP, CHECKPOINT, ADJOINT = "backprop", "checkpoint", "adjoint"
GRADIENT_MODES = (BACKPROP, CHECKPOINT, ADJOINT)


@dataclass(frozen=True)
class Dynamics:
    """A stage seen as a discrete dynamical system on a tuple state (None entries allowed)."""

    init: Callable[[tf.Tensor, tf.Tensor | None], tuple]
    step: Callable[[int, tuple], tuple]
    #: the stage's output from the final state: a tensor or a tuple of tensors.
    output: Callable[[tuple], tf.Tensor | tuple]
    num_steps: int
    reverse_step: Callable[[int, tuple], tuple] | None = None
    #: non-trainable variables holding random-generator state, replayed on recomputation.
    rng_variables: Sequence[keras.Variable] = ()
    #: forward step (−1: init) whose random draws ``reverse_step(n)`` repeats.
    reverse_replays: Callable[[int], int] = lambda n: n
    #: the reverse step evaluates each function at the state the forward evaluated it at
    #: (exact reversals): the vector-Jacobian products may differentiate those evaluations.
    reuse_reverse_evaluations: bool = False


# ----------------------------------------------------------------- hooks for the callers

_context = threading.local()  # MirroredStrategy runs the replicas in threads


class _StepValues:
    """Values recorded per (forward step, owner), in call order."""

    def __init__(self):
        self.values: dict[tuple[int, int], list] = {}
        self.step, self.recording, self.calls = None, False, {}

    def __call__(self, step: int, recording: bool):
        self.step, self.recording, self.calls = step, recording, {}
        return self

    def __enter__(self):
        self.previous = getattr(_context, "values", None)
        _context.values = self
        return self

    def __exit__(self, *exc):
        _context.values = self.previous
        self.step = None


def once_per_step(owner, compute: Callable[[], list], replay: Callable[[list], list]):
    """``compute()`` in a stage's forward step, recorded; when the backward recomputes that
    step, ``replay(recorded)`` instead (e.g. the recorded value with the gradient the computed
    one would have). Outside a memory-saving stage: ``compute()``."""
    store = getattr(_context, "values", None)
    if store is None or store.step is None:
        return compute()
    key = (store.step, id(owner))
    index = store.calls.get(id(owner), 0)
    store.calls[id(owner)] = index + 1
    if store.recording:
        value = compute()
        store.values.setdefault(key, []).append(value)
        return value
    recorded = store.values.get(key, [])
    return replay(recorded[index]) if index < len(recorded) else compute()


class _Evaluations:
    """Taped residual-function evaluations of a reverse step, differentiated by the next
    vector-Jacobian product that calls the same function (instead of evaluating it again)."""

    def __init__(self, variables: list):
        self.variables = variables
        self.recorded: dict[tuple[int, int], tuple] = {}
        self.var_grads: list = [None] * len(variables)
        self.recording, self.step = False, None

    def run(self, recording: bool, step: int, fn: Callable):
        """``fn()`` recording (reverse step) or reusing (VJP) the evaluations of forward
        ``step``: a reverse step records under the step it replays (``reverse_replays``)."""
        previous = getattr(_context, "evaluations", None)
        self.recording, self.step, _context.evaluations = recording, step, self
        try:
            return fn()
        finally:
            _context.evaluations = previous

    def evaluate(self, fn, x):
        key = (id(fn), self.step)
        if self.recording:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            self.recorded[key] = (x, y, tape)
            return y
        recorded = self.recorded.pop(key, None)
        if recorded is None or recorded[0].shape != x.shape:
            return fn(x)
        return self._differentiate(x, *recorded)

    def _differentiate(self, x, x_rec, y_rec, tape):
        @tf.custom_gradient
        def reused(point):
            del point  # equal to x_rec up to rounding: the reversal is exact

            def grad(dy):
                grads = tape.gradient(y_rec, [x_rec, *self.variables], output_gradients=dy)
                _accumulate(self.var_grads, grads[1:])
                return tf.zeros_like(x_rec) if grads[0] is None else grads[0]

            return tf.identity(y_rec), grad

        return reused(x)

    def take_var_grads(self) -> list:
        grads, self.var_grads = self.var_grads, [None] * len(self.variables)
        return grads


def evaluate(fn: Callable, x):
    """``fn(x)``. Inside an adjoint backward that reuses reverse-step evaluations (the caller
    passes one ``fn`` object per residual function: with the forward step, it is the key),
    a reverse step's call is taped, and the vector-Jacobian product of the forward step it
    replays differentiates that evaluation when it calls the same ``fn``, instead of
    evaluating ``fn`` again."""
    evaluations = getattr(_context, "evaluations", None)
    return fn(x) if evaluations is None else evaluations.evaluate(fn, x)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`GRADIENT_MODES`, else a KodeError naming the choices."""
    if mode not in GRADIENT_MODES:
        raise KodeError(
            f"unknown gradient mode '{mode}'; choose one of {', '.join(GRADIENT_MODES)}"
        )
    return mode


def check_gradient_mode(mode: str, integrator, num_steps: int | None = None) -> str:
    """Validate ``mode`` for ``integrator`` (and a stage of ``num_steps`` steps)."""
    check_mode(mode)
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
    xla = in_xla_context()
    if xla and mode == ADJOINT and dynamics.reuse_reverse_evaluations:
        # XLA drops the control dependencies that sequence the rebuilds; the data dependency
        # (_tied) holds checkpointing and the approximate adjoints, not these (measured on
        # XLA:CPU: momentum and reversible Heun keep ~2 states per step either way).
        warnings.warn(
            f"gradient='{mode}' of an exact reversal is compiled with XLA (jit_compile=True): "
            "its memory can grow with the number of steps under XLA (measured for momentum and "
            "reversible Heun); compile with jit_compile=False to keep it constant",
            UserWarning, stacklevel=2)
    segments = (
        [(n, n + 1) for n in range(dynamics.num_steps)]
        if mode == ADJOINT
        else checkpoint_segments(dynamics.num_steps)
    )
    return _integrate_with_custom_gradient(dynamics, x, history, mode, segments, xla=xla)


def _tied(state: tuple, adjoint: list) -> tuple:
    """``state`` + 0·a, a = one element of the cotangent: the same values, made to depend on
    the cotangent by data. XLA keeps data dependencies and drops control dependencies (and
    XLA:CPU expands optimization barriers before scheduling), so without it XLA computes the
    backward's recomputations early, merged with the forward: checkpointing then stored as
    much as backprop (measured). x·0 is not folded for floats (NaN, inf)."""
    first = tf.reshape(adjoint[0], [-1])[0]
    return tuple(None if s is None else s + tf.cast(first, s.dtype) * tf.zeros((), s.dtype)
                 for s in state)


def _tensors(state) -> list:
    return [s for s in state if s is not None]


def _snapshot(variables) -> list:
    return [tf.identity(v.value) for v in variables]


def _replay(dynamics: Dynamics, rng_values, fn, values: _StepValues | None = None,
            step: int | None = None):
    """Run ``fn`` with the random generators as they were and without lasting updates (and
    with the values the forward recorded for ``step``, if given)."""
    mapping = list(zip(dynamics.rng_variables, rng_values, strict=True))
    with keras.StatelessScope(state_mapping=mapping):
        if values is None or step is None:
            return fn()
        with values(step, recording=False):
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


def recompute(fn: Callable, x, rng_variables: Sequence[keras.Variable] = ()):
    """``fn(x)``, differentiated by recomputing ``fn``'s activations from ``x`` in the backward
    instead of storing them (gradient checkpointing of one segment: stored = x; alive during
    its backward = x plus fn's activations). ``fn`` may return a tensor or a tuple of tensors.

    As for a stage's steps, the recomputation replays the random draws of ``rng_variables``
    and discards variable updates (BatchNorm moving statistics are updated once, by the
    forward). A ``recompute`` nested in another one's ``fn`` runs plainly: the outer
    recomputation already keeps nothing, and a nested one would recompute twice more.
    """
    if getattr(_context, "recomputing", 0):
        return fn(x)
    structure = []

    def run(t):
        _context.recomputing = getattr(_context, "recomputing", 0) + 1
        try:
            y = fn(t)
        finally:
            _context.recomputing -= 1
        if not structure:
            structure.append(y)
        return tuple(tf.nest.flatten(y))

    dynamics = Dynamics(
        init=lambda x, history: (x,),
        step=lambda n, state: run(state[0]),
        output=lambda state: tf.nest.pack_sequence_as(structure[0], list(state)),
        num_steps=1,
        rng_variables=rng_variables,
    )
    return integrate(dynamics, x, mode=CHECKPOINT)


def _integrate_with_custom_gradient(dynamics, x, history, mode, segments, xla=False):
    inputs = [x] if history is None else [x, history]

    @tf.custom_gradient
    def forward(*inputs):
        hist = inputs[1] if len(inputs) > 1 else None
        # Without stop_recording an outer eager tape would keep every intermediate alive.
        values = _StepValues()
        with stop_recording():
            rng_init = _snapshot(dynamics.rng_variables)
            with values(-1, recording=True):
                state = dynamics.init(inputs[0], hist)
            rng_at, stored = [], {}
            starts = {start for start, _ in segments}
            for n in range(dynamics.num_steps):
                rng_at.append(_snapshot(dynamics.rng_variables))
                if mode == CHECKPOINT and n in starts:
                    stored[n] = state
                with values(n, recording=True):
                    state = dynamics.step(n, state)
            out = dynamics.output(state)
        final_state = state

        def grad_fn(*dys, variables=None):
            variables = list(variables or [])
            var_grads = [None] * len(variables)
            reuse = mode == ADJOINT and dynamics.reuse_reverse_evaluations
            tie = xla and not reuse  # the reused evaluations' case is measured not to hold
            evaluations = _Evaluations(variables) if reuse else None

            def evaluating(recording, step, fn):
                return fn() if evaluations is None else evaluations.run(recording, step, fn)
            with tf.GradientTape() as tape:
                targets = _tensors(final_state)
                tape.watch(targets)
                ys = tf.nest.flatten(dynamics.output(final_state))
            adjoint = tape.gradient(
                ys, targets, output_gradients=_zeros_for_none(dys, ys),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            state_out = final_state
            for start, end in reversed(segments):
                stored_in = stored.get(start)
                if tie:  # under XLA: the segment's input waits for the cotangent by data
                    if mode == ADJOINT:
                        state_out = _tied(state_out, adjoint)
                    else:
                        stored_in = _tied(stored_in, adjoint)
                # Sequence the rebuild after the previous VJP: at most a few states alive.
                with tf.control_dependencies(adjoint):
                    if mode == ADJOINT:
                        replayed = dynamics.reverse_replays(start)
                        state_in = evaluating(True, replayed, lambda s=state_out, n=start,
                                              r=replayed: (
                            _replay(dynamics, rng_at[r] if r >= 0 else rng_init,
                                    lambda: dynamics.reverse_step(n, s), values, r)))
                        state_in = tuple(
                            None if s is None else tf.stop_gradient(s) for s in state_in
                        )
                    else:
                        state_in = tuple(
                            None if s is None else tf.identity(s) for s in stored_in
                        )
                with tf.GradientTape() as tape:
                    sources = _tensors(state_in)
                    tape.watch(sources)
                    state = state_in
                    for n in range(start, end):
                        state = evaluating(False, n, lambda s=state, n=n: _replay(
                            dynamics, rng_at[n], lambda: dynamics.step(n, s), values, n))
                grads = tape.gradient(_tensors(state), sources + variables,
                                      output_gradients=adjoint)
                adjoint = _zeros_for_none(grads[: len(sources)], sources)
                _accumulate(var_grads, grads[len(sources):])
                if evaluations is not None:
                    _accumulate(var_grads, evaluations.take_var_grads())
                state_out = state_in
            with tf.GradientTape() as tape:
                tape.watch(list(inputs))
                state = evaluating(False, -1, lambda: _replay(
                    dynamics, rng_init, lambda: dynamics.init(inputs[0], hist), values, -1))
            grads = tape.gradient(_tensors(state), list(inputs) + variables,
                                  output_gradients=adjoint)
            _accumulate(var_grads, grads[len(inputs):])
            if evaluations is not None:
                _accumulate(var_grads, evaluations.take_var_grads())
            var_grads = [
                g if g is not None and v.trainable else None
                for g, v in zip(var_grads, variables, strict=True)
            ]
            return _zeros_for_none(grads[: len(inputs)], inputs), var_grads

        return out, grad_fn

    return forward(*inputs)


def reconstruction_error(dynamics: Dynamics, x, history=None) -> float:
    """max |x_0 − x̂_0| / max |x_0|, x̂_0 rebuilt by N reverse steps from the forward's x_N,
    both as the stage outputs a state (``dynamics.output``: its compute dtype).

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
    # x as the stage outputs it (its compute dtype under mixed precision), in one dtype.
    x = tf.cast(_replay(dynamics, rng, lambda: dynamics.output(dynamics.init(x, history))),
                rebuilt.dtype)
    if rebuilt.dtype.size < 4:
        rebuilt, x = tf.cast(rebuilt, tf.float32), tf.cast(x, tf.float32)
    return float(tf.reduce_max(tf.abs(rebuilt - x)) / (tf.reduce_max(tf.abs(x)) + 1e-30))

