"""A model's integrator stages, what they receive and LM's k_n per step: what the guard, the
diagnostics and refinement look at."""

from __future__ import annotations

import keras

from kode.layers.stage import IntegratorStage, integrator_stages

__all__ = ["integrator_stages", "lm_k_steps", "stage_inputs"]


def stage_inputs(model: keras.Model, x, training: bool = False,
                 stages: list[IntegratorStage] | None = None) -> list[tuple]:
    """Per stage of ``model`` (or of ``stages``), the ``(x_0, history)`` it receives on input
    ``x``; ``history`` is None for a stage without a previous state (everything but LM)."""
    stages = integrator_stages(model) if stages is None else stages
    if not stages:
        return []
    received = keras.Model(model.inputs, [s.input for s in stages])(x, training=training)
    if len(stages) == 1:  # a one-output model returns its output unwrapped
        received = [received]
    return [tuple(inputs) if isinstance(inputs, list | tuple) else (inputs, None)
            for inputs in received]


def lm_k_steps(model: keras.layers.Layer) -> list[tuple[str, keras.Variable, int, int]]:
    """Every LM k_n of ``model``'s stages, in network order, as ``(label, variable, index,
    step)``: k_n is ``variable[index]`` and belongs to step ``n = step`` of its stage.

    A stage keeps its K k_n in one (K,) variable ``<stage>/lm_k`` whose entry i is step
    n = N − K + i (N the stage's steps: the network's first stage starts with an Euler step
    without k). ``label`` is ``<variable path>_<n>``, e.g. ``stage1/lm_k_1``: the path the
    per-step scalar variables of earlier versions had, so TensorBoard tags and figure labels
    stay the same.
    """
    found = []
    for stage in integrator_stages(model):
        for v in stage.integrator_variables:
            if "lm_k" not in v.path:
                continue
            first = stage.num_steps - v.shape[0]
            found += [(f"{v.path}_{first + i}", v, i, first + i) for i in range(v.shape[0])]
    return found
