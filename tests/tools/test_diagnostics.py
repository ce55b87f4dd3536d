"""TensorBoard diagnostics: the event files hold what kode.diagnostics promises."""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kode import IntegratorStage
from kode.tools.diagnostics import residual_sizes
from kode.training.pipeline import train


def _events(logdir: str) -> dict[str, list]:
    """tag → values (scalars as floats, histograms as their tensor protos) over all epochs."""
    found: dict[str, list] = {}
    for path in glob.glob(os.path.join(logdir, "diagnostics", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                found.setdefault(value.tag, []).append(tensor)
    return found


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    # depth 14: two blocks per stage, so three LM steps carry a k_n.
    return train("lm_resnet20", "digits", epochs=2, model_options={"depth": 14},
                 logdir=str(tmp_path_factory.mktemp("lm")), verbose=0)


def test_scalars_lm_k_and_residual_sizes_are_written(lm_run):
    events = _events(lm_run.logdir)
    for tag in ("train/loss", "train/accuracy", "train/learning_rate", "val/loss",
                "train/images_per_second"):
        assert len(events[tag]) == 2, tag  # one per epoch
    np.testing.assert_allclose(float(events["train/loss"][-1]), lm_run.history["loss"][-1],
                               rtol=1e-6)
    assert all(float(v) > 0 for v in events["train/images_per_second"])
    ks = [v for v in lm_run.model.variables if "lm_k" in v.path]
    assert len(ks) == 3
    for k in ks:  # the scalar of the last epoch is the trained k_n
        assert float(events[f"lm_k/{k.path}"][-1]) == pytest.approx(float(k.numpy()), abs=1e-7)
    assert "lm_k/all" in events and events["lm_k/all"][-1].shape[-1] == 3  # histogram buckets
    for stage in ("stage1", "stage2", "stage3"):
        steps = [t for t in events if t.startswith(f"residual/{stage}/step_")]
        assert steps, stage
        assert all(np.isfinite(float(events[t][-1])) and float(events[t][-1]) > 0 for t in steps)
        assert f"residual/{stage}" in events


@pytest.mark.numerics
def test_guard_error_is_written_when_the_adjoint_is_rechecked(tmp_path):
    result = train("revheun_resnet20", "digits", epochs=1, model_options={"depth": 8},
                   gradient="adjoint", guard_every=1, logdir=str(tmp_path), verbose=0)
    events = _events(result.logdir)
    error = float(events["gradient_guard/adjoint_gradient_error"][-1])
    assert error == pytest.approx(result.config["gradient_guard"][-1]["max_error"])
    # reversible Heun: exact up to rounding, on any CPU (the guard's batch alone gave 6e-3
    # here on avx512 kernels: a ReLU input within rounding of zero, docs/gradients.md)
    assert error <= 1e-5


def test_residual_size_is_the_mean_norm_of_the_step_over_h():
    keras.utils.set_random_seed(0)
    fns = [keras.layers.Dense(6, activation="tanh") for _ in range(3)]
    inputs = keras.Input((6,))
    # Named: an auto name ("integrator_stage_7") depends on which tests ran before.
    stage = IntegratorStage(fns, "euler", step_size=0.5, name="stage")
    model = keras.Model(inputs, stage(inputs))
    x = np.random.default_rng(0).standard_normal((5, 6)).astype("float32")
    sizes = residual_sizes(model, x)["stage"]
    state, expected = x, []
    for f in fns:  # Euler: (x_{n+1} - x_n) / h = f_n(x_n)
        step = np.asarray(f(state))
        expected.append(np.linalg.norm(step, axis=1).mean())
        state = state + 0.5 * step
    np.testing.assert_allclose(sizes, expected, rtol=1e-5)
