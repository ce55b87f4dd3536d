"""Refine a trained network by untying its residual functions (Sander et al. 2022, Table 2).

Every Euler step x ← x + h f_n(x) of a stage becomes m steps of size h/m, each with its own
copy of f_n initialized with f_n's weights:

    x ← x + (h/m) f_{n,1}(x); …; x ← x + (h/m) f_{n,m}(x),   f_{n,j} := f_n at the start.

A stage whose N steps share one function (tied weights) becomes N·m separate functions. As m
grows the stage approaches the flow of its piecewise-constant weights, the regime in which the
Euler reversal, hence the memory-free adjoint, is accurate; m = 1 returns an identical copy.

``refine(model, "auto", x=..., y=..., tolerance=...)`` chooses m (:func:`choose_factor`): the
smallest of 1, 2, 4, 8, 16 whose adjoint gradient error, measured by the gradient guard on the
batch (x, y), is at most the tolerance.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import keras
import numpy as np

from kode.errors import KodeError
from kode.integrators import Euler
from kode.layers.stage import IntegratorStage, integrator_stages

#: Integrators whose step x + h f(x) splits into m steps of h/m with the same f.
REFINABLE = (Euler,)


#: The factors ``"auto"`` tries, in order; it stops at the first that passes.
AUTO_FACTORS = (1, 2, 4, 8, 16)


def check_refine(factor) -> int | str:
    """A refinement setting: ``"auto"`` or the factor m as an int ≥ 1, else a KodeError."""
    if isinstance(factor, str) and factor == "auto":
        return "auto"
    try:
        return check_factor(factor)
    except KodeError:
        raise KodeError("refinement factor must be a positive integer or 'auto', "
                        f"got {factor!r}") from None


def check_factor(factor) -> int:
    """The refinement factor m as an int ≥ 1, or a KodeError."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise KodeError(f"refinement factor must be a positive integer, got {factor!r}")
    if not isinstance(factor, numbers.Integral):
        if not (math.isfinite(factor) and float(factor).is_integer()):
            raise KodeError(f"refinement factor must be a positive integer, got {factor!r}")
    if factor < 1:
        raise KodeError(f"refinement factor must be a positive integer (m >= 1), got {factor!r}")
    return int(factor)


def _copy(layer: keras.layers.Layer, name: str) -> keras.layers.Layer:
    config = {**layer.get_config(), "name": name}
    return type(layer).from_config(config)


def _refined_stage(stage: IntegratorStage, m: int) -> tuple[IntegratorStage, list]:
    """The refined stage and (copy, source) pairs whose weights it must receive."""
    pairs, functions = [], []
    for f in stage.residual_functions:
        for j in range(m):
            copy = _copy(f, f.name if m == 1 else f"{f.name}_{j}")
            functions.append(copy)
            pairs.append((copy, f))
    step_size = stage.step_size_spec if stage.step_size_spec == "ode" else stage.h / m
    refined = IntegratorStage(functions, stage.integrator, step_size, stage.horizon,
                              stage.gradient, name=stage.name, dtype=stage.dtype_policy)
    if not stage.trainable:  # a frozen stage stays frozen
        refined.trainable = False
    return refined, pairs


def refine(model: keras.Model, factor: int | str = 2, *, x=None, y=None,
           tolerance: float = 0.05, loss: keras.losses.Loss | None = None,
           log=None) -> keras.Model:
    """A copy of ``model`` whose Euler stages take ``factor`` untied steps of h/m per step.

    ``factor="auto"``: m is chosen by :func:`choose_factor` on the batch (``x``, ``y``) with
    ``tolerance`` (the guard's default 0.05) and ``loss``; ``log`` (e.g. ``print``) receives
    its table. ``x``, ``y``, ``tolerance``, ``loss`` and ``log`` are only for ``"auto"``.

    Other layers are copied with their weights. Raises KodeError for m < 1, a non-integer m,
    a model without stages, and stages whose integrator cannot be refined this way.
    """
    if isinstance(factor, str) and factor == "auto":
        if x is None or y is None:
            raise KodeError("refine(model, 'auto') measures the adjoint's gradient error on a "
                            "batch: pass x=... and y=... (inputs and labels)")
        return choose_factor(model, x, y, tolerance, loss=loss, log=log).model
    m = check_factor(factor)
    stages = integrator_stages(model)
    if not stages:
        raise KodeError(f"model '{model.name}' has no integrator stage to refine")
    for stage in stages:
        if not isinstance(stage.integrator, REFINABLE):
            raise KodeError(
                f"stage '{stage.name}' uses integrator '{stage.integrator.name}', which cannot "
                "be refined: only Euler steps x + h f(x) split into m steps x + (h/m) f(x) "
                "(post-activation relu(x + f(x)) and multi-function schemes do not)")
    pairs: list = []

    def clone(layer):
        if isinstance(layer, IntegratorStage):
            refined, stage_pairs = _refined_stage(layer, m)
            pairs.extend(stage_pairs)
            return refined
        copy = type(layer).from_config(layer.get_config())
        pairs.append((copy, layer))
        return copy

    try:
        result = keras.models.clone_model(model, clone_function=clone)
    except ValueError as err:
        raise KodeError(f"model '{model.name}' cannot be refined: {err}") from None
    missing = {id(s) for s in stages} - {id(lay) for lay in model.layers}
    if missing:
        raise KodeError(f"model '{model.name}' holds stages inside nested models; refine "
                        "works on the top-level stages of a functional model")
    for copy, source in pairs:
        copy.set_weights(source.get_weights())
    return result


@dataclass(frozen=True)
class RefineReport:
    """What refinement changed, for the user: outputs and the adjoint's gradient error."""

    factor: int
    parameters_before: int
    parameters_after: int
    output_change: float  # max |refined(x) − original(x)|, inference mode
    gradient_error_before: float  # guard: max stage relative error, adjoint vs backprop
    gradient_error_after: float

    def format(self) -> str:
        return (f"refine ×{self.factor}: parameters {self.parameters_before:,} → "
                f"{self.parameters_after:,}; output change max|Δ| = {self.output_change:.3e}; "
                f"adjoint gradient error (guard) {self.gradient_error_before:.3e} → "
                f"{self.gradient_error_after:.3e}")


def refine_report(original: keras.Model, refined: keras.Model, x, y, factor: int,
                  loss: keras.losses.Loss | None = None) -> RefineReport:
    """Measure a refinement on one batch (x, y): output change and guard error before/after."""
    from kode.tools.guard import check_gradients

    change = float(np.max(np.abs(np.asarray(refined(x, training=False))
                                 - np.asarray(original(x, training=False)))))
    before = check_gradients(original, x, y, loss).max_error
    after = check_gradients(refined, x, y, loss).max_error
    return RefineReport(factor, original.count_params(), refined.count_params(), change,
                        before, after)


@dataclass(frozen=True)
class FactorRow:
    """One candidate of :func:`choose_factor`."""

    factor: int
    stage_steps: tuple[int, ...]  # N of each stage of the refined model
    parameters: int
    gradient_error: float  # the guard's: max over the stages that run the adjoint
    memory_backprop: int  # estimated bytes of stage states backprop keeps (see choose_factor)
    memory_adjoint: int  # … and the adjoint keeps
    passed: bool

    def as_dict(self) -> dict:
        return {"m": self.factor, "stage_steps": list(self.stage_steps),
                "parameters": self.parameters, "gradient_error": self.gradient_error,
                "memory_backprop_bytes": self.memory_backprop,
                "memory_adjoint_bytes": self.memory_adjoint, "passed": self.passed}


@dataclass(frozen=True)
class RefineChoice:
    """What ``refine="auto"`` measured (``rows``, in order, up to the first that passed) and
    chose (``factor``; ``model`` is that refined model)."""

    rows: tuple[FactorRow, ...]
    tolerance: float
    factor: int | None
    model: keras.Model | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"chosen": self.factor, "tolerance": self.tolerance,
                "candidates": [r.as_dict() for r in self.rows]}

    def format(self) -> str:
        lines = [f"{'m':>3s} {'stage steps':16s} {'parameters':>12s} {'grad rel err':>12s}  "
                 "est. activation memory (backprop / adjoint)"]
        for r in self.rows:
            steps = "+".join(str(n) for n in r.stage_steps)
            verdict = "<= tolerance" if r.passed else "> tolerance"
            lines.append(f"{r.factor:3d} {steps:16s} {r.parameters:12,d} "
                         f"{r.gradient_error:12.3e}  {_bytes(r.memory_backprop):>10s} / "
                         f"{_bytes(r.memory_adjoint):<10s}  {verdict} {self.tolerance:.3g}")
        lines.append("est. activation memory: stage states kept for the batch (estimate: "
                     "backprop N per stage, adjoint 1; the residual functions' own "
                     "activations are not counted)")
        if self.factor is not None:
            lines.append(f"refine auto: chose m = {self.factor}")
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def _state_bytes(stage: IntegratorStage, batch: int) -> int:
    """Bytes of one state of ``stage`` (its input's shape, batch ``batch``)."""
    shape = [batch if d is None else int(d) for d in stage.input.shape]
    return math.prod(shape) * np.dtype(stage.compute_dtype).itemsize


def choose_factor(model: keras.Model, x, y, tolerance: float = 0.05,
                  factors=AUTO_FACTORS, loss: keras.losses.Loss | None = None,
                  log=None) -> RefineChoice:
    """The smallest m in ``factors`` whose refined model's adjoint gradient error is at most
    ``tolerance``, tried in order, stopping at the first that passes.

    Each candidate is ``refine(model, m)``, measured by the gradient guard
    (:func:`kode.tools.guard.check_gradients` with ``mode="adjoint"`` on (x, y)); its error is
    the largest over the stages that run the adjoint (the guard's stages in mode "adjoint":
    reversible integrators; frozen stages, with no gradient, do not count).

    Estimated activation memory, per candidate, for the batch x (an estimate: only the
    stages' states, not the activations inside the residual functions nor the rest of the
    model):

        backprop = Σ_stages N_s · S_s,     adjoint = Σ_stages S_s,

    N_s the stage's number of steps, S_s = (elements of the stage's input for the batch) ×
    (bytes of its compute dtype): backprop keeps every step's input, the adjoint only the
    stage's output, from which it reverses. Refinement multiplies the first by m, not the
    second.

    ``log`` (e.g. ``print``) receives the table (:meth:`RefineChoice.format`). If no m
    passes: a one-line KodeError with the smallest error reached (after logging the table).
    """
    from kode.gradients import ADJOINT
    from kode.tools.guard import check_gradients, check_tolerance

    tolerance = check_tolerance(tolerance)
    factors = tuple(check_factor(m) for m in factors)
    if not factors:
        raise KodeError("choose_factor needs at least one refinement factor to try")
    batch = int(np.shape(x)[0])
    rows, chosen = [], None
    for m in factors:
        candidate = refine(model, m)
        report = check_gradients(candidate, x, y, loss, mode=ADJOINT)
        errors = [s.gradient_error for s in report.stages
                  if s.mode == ADJOINT and not math.isnan(s.gradient_error)]
        error = max(errors, default=0.0)
        stages = integrator_stages(candidate)
        sizes = [_state_bytes(s, batch) for s in stages]
        passed = error <= tolerance
        rows.append(FactorRow(m, tuple(s.num_steps for s in stages), candidate.count_params(),
                              error, sum(s.num_steps * b for s, b in zip(stages, sizes,
                                                                         strict=True)),
                              sum(sizes), passed))
        if passed:
            chosen = candidate
            break
        del candidate
    choice = RefineChoice(tuple(rows), tolerance, rows[-1].factor if chosen else None, chosen)
    if log is not None:
        log(f"refine auto (adjoint gradient error, gradient guard, tolerance "
            f"{tolerance:.3g}):\n{choice.format()}")
    if chosen is None:
        best = min(rows, key=lambda r: r.gradient_error)
        raise KodeError(
            f"no refinement factor up to {max(factors)} brings the adjoint's gradient error "
            f"under the tolerance {tolerance:.3g} (smallest: {best.gradient_error:.3g} at "
            f"m = {best.factor}); train with --gradient checkpoint")
    return choice
