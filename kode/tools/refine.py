"""Refine a trained network by untying its residual functions (Sander et al. 2022, Table 2).

Every Euler step x ← x + h f_n(x) of a stage becomes m steps of size h/m, each with its own
copy of f_n initialized with f_n's weights:

    x ← x + (h/m) f_{n,1}(x); …; x ← x + (h/m) f_{n,m}(x),   f_{n,j} := f_n at the start.

A stage whose N steps share one function (tied weights) becomes N·m separate functions. As m
grows the stage approaches the flow of its piecewise-constant weights, the regime in which the
Euler reversal, hence the memory-free adjoint, is accurate; m = 1 returns an identical copy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import keras
import numpy as np

from kode.errors import KodeError
from kode.integrators import Euler
from kode.layers.stage import IntegratorStage, integrator_stages

#: Integrators whose step x + h f(x) splits into m steps of h/m with the same f.
REFINABLE = (Euler,)


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
    return refined, pairs


def refine(model: keras.Model, factor: int = 2) -> keras.Model:
    """A copy of ``model`` whose Euler stages take ``factor`` untied steps of h/m per step.

    Other layers are copied with their weights. Raises KodeError for m < 1, a non-integer m,
    a model without stages, and stages whose integrator cannot be refined this way.
    """
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
