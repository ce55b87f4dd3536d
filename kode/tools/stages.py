"""A model's integrator stages and what they receive: what the guard, the diagnostics and
refinement look at."""

from __future__ import annotations

import keras

from kode.layers.stage import IntegratorStage, integrator_stages

__all__ = ["integrator_stages", "stage_inputs"]


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
