"""The gradient guard: how wrong are the adjoint's gradients on this model, right now?

The memory-free adjoint is exact only for exactly reversible integrators. For Euler and Heun
its error depends on how ODE-like the network is (Sander et al. 2022: h = 1/N and weights
smooth in depth make it small; h = 1 and i.i.d. weights do not), so kode measures it instead
of assuming it: per stage, the relative error of the stage's parameter gradients,
‖g_adjoint − g_backprop‖ / ‖g_backprop‖, and the reconstruction error of the stage input
after N steps forward and N reverse steps, max|x_0 − x̂_0| / max|x_0|.

The gradient error is the smallest of that ratio over a few nearby batches: the guard's batch
x and ``points − 1`` copies x + 10⁻³·rms(x)·u_k (u_k standard normal, seeded), each with
its own backprop reference:

    e_stage = min_k ‖g_adjoint(x_k) − g_backprop(x_k)‖ / ‖g_backprop(x_k)‖

Why the minimum: a gradient is discontinuous where a ReLU's input crosses zero. The adjoint
recomputes the states, and an exact reversal reproduces them only to rounding (about 10⁻⁷
relative in float32), so a pre-activation that lies within rounding of zero may fall on one
side in the forward and on the other in the recomputation. Its whole contribution then counts
in one gradient and not in the other: measured (docs/gradients.md), one pre-activation at
1.9·10⁻⁷ among 32 768 made an exact reversible-Heun stage report 6·10⁻³, on avx512 kernels
only, because which side it lands on depends on the kernels' rounding. Such a tie is a
chance event of one point; at a point 10⁻³ away it is no longer within rounding of its kink,
and another tie is unlikely. An adjoint that is inexact (Euler, Heun) is wrong at every
nearby point by about the same amount (its error is smooth in x), so the minimum keeps it.
The error at every point is kept in the report (``point_errors``, ``format()``'s last
columns), so that a large spread is seen, not hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError
from kode.gradients import ADJOINT, BACKPROP, CHECKPOINT, reconstruction_error
from kode.layers.stage import recomputable_layers
from kode.tools.stages import integrator_stages, stage_inputs


@dataclass(frozen=True)
class StageCheck:
    """The guard's numbers for one stage."""

    name: str
    integrator: str
    num_steps: int
    step_size: float
    mode: str
    #: min over the points of the relative gradient error (see the module docstring).
    gradient_error: float
    reconstruction_error: float
    #: the relative gradient error at each point: the guard's batch first, then the nearby.
    point_errors: tuple[float, ...] = ()


@dataclass(frozen=True)
class GradientReport:
    stages: tuple[StageCheck, ...]
    #: relative error over all the model's trainable variables (min over the points).
    model_error: float
    #: that error at each point.
    model_point_errors: tuple[float, ...] = ()
    #: the layers outside the stages recomputed in the backward (the rest backpropagate).
    recomputed: tuple[str, ...] = ()
    #: how many layers outside the stages could recompute (transitions, segments).
    recomputable: int = 0

    @property
    def max_error(self) -> float:
        errors = [s.gradient_error for s in self.stages if not math.isnan(s.gradient_error)]
        return max(errors, default=0.0)

    def inaccurate(self, tolerance: float) -> list[StageCheck]:
        return [s for s in self.stages if s.gradient_error > tolerance]

    def format(self) -> str:
        lines = [f"{'stage':10s} {'integrator':16s} {'N':>4s} {'h':>8s} {'mode':10s} "
                 f"{'worst point':>12s} {'grad rel err':>12s} {'reconstr err':>12s}"]
        for s in self.stages:
            lines.append(f"{s.name:10s} {s.integrator:16s} {s.num_steps:4d} {s.step_size:8.4g} "
                         f"{s.mode:10s} {_worst(s.point_errors, s.gradient_error):12.3e} "
                         f"{s.gradient_error:12.3e} {s.reconstruction_error:12.3e}")
        points = len(self.model_point_errors) or 1
        if self.recomputable:
            lines.append(f"outside the stages: {len(self.recomputed)} of {self.recomputable} "
                         "layers (stem, transitions, head) recomputed in the backward"
                         + (f" ({', '.join(self.recomputed)})" if self.recomputed else
                            " (recompute off: they store their activations)"))
        lines.append(f"whole model: relative gradient error {self.model_error:.3e} "
                     f"(worst point {_worst(self.model_point_errors, self.model_error):.3e})")
        if points > 1:
            lines.append(f"grad rel err: the smallest over {points} nearby batches; worst point: "
                         "the largest (a ReLU input within rounding of zero at one batch)")
        return "\n".join(lines)


def _worst(errors: tuple[float, ...], error: float) -> float:
    if not errors or any(math.isnan(e) for e in errors):
        return error
    return max(errors)


def _least(errors: list[float]) -> float:
    """min, nan if any is nan (a stage without gradients has nan at every point), inf if any
    is inf: a non-finite gradient at one point is wrong, not a tie at a ReLU kink."""
    if any(math.isnan(e) for e in errors):
        return float("nan")
    return float("inf") if any(math.isinf(e) for e in errors) else min(errors)


def check_tolerance(tolerance: float) -> float:
    if not isinstance(tolerance, int | float) or not tolerance > 0 or math.isnan(tolerance):
        raise KodeError(f"tolerance must be a positive number, got {tolerance!r}")
    return float(tolerance)


def model_gradients(model: keras.Model, loss_fn: keras.losses.Loss, x, y) -> list:
    """∂loss/∂w for every trainable variable of ``model`` in training mode (zeros where a
    variable gets none), as the model's gradient modes compute it."""
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
            for g, v in zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables, strict=True)]


def relative_error(got: list, want: list) -> float:
    """‖got − want‖ / ‖want‖ (float64 sums); nan without tensors (nothing to compare), inf
    when either side has a non-finite value, so that the guard flags it."""
    if not want:
        return float("nan")
    num = math.sqrt(sum(float(tf.reduce_sum(tf.square(tf.cast(a, tf.float64)
                                                      - tf.cast(b, tf.float64))))
                        for a, b in zip(got, want, strict=True)))
    den = math.sqrt(sum(float(tf.reduce_sum(tf.square(tf.cast(b, tf.float64))))
                        for b in want))
    error = num / den if den > 0 else num
    return error if math.isfinite(error) else float("inf")


#: relative size of the nearby batches' perturbation: far above float32 rounding (a tie at a
#: ReLU kink within rounding of zero does not survive it), far below what changes the model's
#: gradients (a smooth adjoint error is the same at every point).
NEARBY = 1e-3


def nearby_batches(x, points: int) -> list:
    """The batch ``x`` and ``points − 1`` copies x + NEARBY·rms(x)·u_k, u_k ~ N(0, 1) drawn
    with seed k (the same points every time). A non-float input (token ids) has no nearby
    point: ``[x]``."""
    if points < 1:
        raise KodeError(f"points must be a positive number of batches, got {points!r}")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        return [x]
    scale = NEARBY * float(tf.sqrt(tf.reduce_mean(tf.square(tf.cast(x, tf.float32)))))
    return [x] + [
        x + tf.constant(scale * np.random.default_rng(k).standard_normal(x.shape), x.dtype)
        for k in range(1, points)
    ]


def check_gradients(
    model: keras.Model, x, y, loss: keras.losses.Loss | None = None, mode: str = ADJOINT,
    points: int = 3,
) -> GradientReport:
    """Compare ``mode`` gradients with backprop, stage by stage, on the batch ``x`` and
    ``points − 1`` nearby batches (:func:`nearby_batches`); a stage's error is the smallest
    over the points (the module docstring says why), each point's error is in the report.

    Stages whose integrator has no reversal are checked in ``checkpoint`` mode (exact). The
    model's state (BN moving statistics, random generators, gradient modes) is left as found.
    """
    loss_fn = loss or keras.losses.SparseCategoricalCrossentropy()
    stages = integrator_stages(model)
    if not stages:
        raise KodeError(f"model '{model.name}' has no integrator stage to check")
    saved_modes = [s.gradient for s in stages]
    outside = recomputable_layers(model)
    outside_modes = [layer.gradient for layer in outside]
    saved_state = [np.array(v) for v in model.non_trainable_variables]
    x = tf.convert_to_tensor(x)
    batches = nearby_batches(x, points)
    index = {v.path: i for i, v in enumerate(model.trainable_variables)}
    positions = [[index[v.path] for v in s.trainable_variables] for s in stages]
    stage_errors: list[list[float]] = [[] for _ in stages]
    model_errors: list[float] = []
    try:
        used = []
        for s in stages:
            used.append(mode if (mode != ADJOINT or s.integrator.reversible) else CHECKPOINT)
        for batch in batches:
            for layer in [*stages, *outside]:
                layer.gradient = BACKPROP
            reference = model_gradients(model, loss_fn, batch, y)
            _restore(model, saved_state)
            for s, m in zip(stages, used, strict=True):
                s.gradient = m
            for layer, m in zip(outside, outside_modes, strict=True):
                layer.gradient = m
            measured = model_gradients(model, loss_fn, batch, y)
            _restore(model, saved_state)
            for errors, where in zip(stage_errors, positions, strict=True):
                errors.append(relative_error([measured[i] for i in where],
                                        [reference[i] for i in where]))
            model_errors.append(relative_error(measured, reference))
        received = stage_inputs(model, x, training=True, stages=stages)
        _restore(model, saved_state)
    finally:
        for layer, m in zip([*stages, *outside], saved_modes + outside_modes, strict=True):
            layer.gradient = m
    checks = []
    for stage, stage_mode, (x0, history), errors in zip(stages, used, received, stage_errors,
                                                        strict=True):
        checks.append(StageCheck(
            stage.name, stage.integrator.name, stage.num_steps, stage.h, stage_mode,
            _least(errors), reconstruction_error(stage.dynamics(training=True), x0, history),
            tuple(errors),
        ))
    _restore(model, saved_state)
    recomputed = tuple(layer.name for layer, m in zip(outside, outside_modes, strict=True)
                       if m != BACKPROP)
    return GradientReport(tuple(checks), _least(model_errors), tuple(model_errors),
                          recomputed, len(outside))


def _restore(model, values) -> None:
    for v, value in zip(model.non_trainable_variables, values, strict=True):
        v.assign(value)


class GradientGuard(keras.callbacks.Callback):
    """Checks the adjoint at the start of training and every ``every`` epochs; above
    ``tolerance`` either stops (``on_inaccurate="stop"``) or switches the inaccurate stages
    to ``checkpoint`` (exact gradients, O(√N) memory) and says so."""

    def __init__(self, x, y, tolerance: float = 0.05, every: int | None = None,
                 on_inaccurate: str = "stop", log=print):
        super().__init__()
        if on_inaccurate not in ("stop", "fallback"):
            raise KodeError(f"on_inaccurate must be 'stop' or 'fallback', got '{on_inaccurate}'")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise KodeError(f"guard interval must be a positive number of epochs, got {every!r}")
        self.x, self.y = x, y
        self.tolerance = check_tolerance(tolerance)
        self.every, self.on_inaccurate, self.log = every, on_inaccurate, log
        self.reports: list[dict] = []

    def on_train_begin(self, logs=None):
        self._check(epoch=0)

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0:
            report = self._check(epoch=epoch + 1)
            if logs is not None:
                logs["adjoint_gradient_error"] = report.max_error

    def _check(self, epoch: int) -> GradientReport:
        report = check_gradients(self.model, self.x, self.y, self.model.loss or None)
        bad = report.inaccurate(self.tolerance)
        self.reports.append({"epoch": epoch, "max_error": report.max_error,
                             "stages": [s.__dict__ for s in report.stages],
                             "action": "none" if not bad else self.on_inaccurate})
        self.log(f"gradient guard (epoch {epoch}):\n{report.format()}")
        if not bad:
            return report
        worst = max(bad, key=lambda s: s.gradient_error)
        summary = (f"adjoint gradients are inaccurate: {worst.name} relative error "
                   f"{worst.gradient_error:.3g} > tolerance {self.tolerance:.3g}")
        if self.on_inaccurate == "stop":
            raise KodeError(f"{summary}; train with gradient 'checkpoint', step_size 'ode', or "
                            "--on-inaccurate fallback")
        names = {s.name for s in bad}
        for stage in integrator_stages(self.model):
            if stage.name in names:
                stage.gradient = CHECKPOINT
        self.model.train_function = None
        self.model.make_train_function(force=True)
        self.log(f"{summary}; switched {', '.join(sorted(names))} to 'checkpoint'")
        return report
