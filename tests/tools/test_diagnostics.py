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
    # One scalar per LM step, tagged as when each k_n was its own variable: stage1's step 1
    # (its step 0 is Euler), step 0 of stages 2 and 3 (after the transitions).
    tags = sorted(t for t in events if t.startswith("lm_k/") and t.count("/") == 2)
    assert tags == ["lm_k/stage1/lm_k_1", "lm_k/stage2/lm_k_0", "lm_k/stage3/lm_k_0"]
    for stage in ("stage1", "stage2", "stage3"):  # the scalar of the last epoch: trained k_n
        (k,) = lm_run.model.get_layer(stage).integrator_variables
        (tag,) = [t for t in tags if t.startswith(f"lm_k/{stage}/")]
        assert float(events[tag][-1]) == pytest.approx(float(k.numpy()[0]), abs=1e-7)
        assert f"lm_k/{stage}" in events
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


def test_lm_k_values_name_every_step_of_the_stage_vectors():
    # depth 20: three blocks per stage, so each stage's (K,) lm_k holds two k_n.
    import zoo
    from kode.tools.diagnostics import lm_k_values

    model = zoo.create_model("lm_resnet20", depth=20, input_shape=(8, 8, 1), classes=10)
    for i, stage in enumerate(("stage1", "stage2", "stage3")):
        model.get_layer(stage).integrator_variables[0].assign([0.1 * i, 0.1 * i + 0.05])
    labels, values = zip(*lm_k_values(model), strict=True)
    assert labels == ("stage1/lm_k_1", "stage1/lm_k_2", "stage2/lm_k_0", "stage2/lm_k_1",
                      "stage3/lm_k_0", "stage3/lm_k_1")
    np.testing.assert_allclose(values, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25], rtol=1e-6)
    assert lm_k_values(zoo.create_model("resnet20", depth=20, input_shape=(8, 8, 1))) == []
