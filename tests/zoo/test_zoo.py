"""Zoo registry, builder signatures, parameter counts and bad input."""

import re

import numpy as np
import pytest

import zoo
from kode.errors import KodeError

# docs/reference.md §2: LM-ResNet trainable parameters with 10 classes (the authors' code).
LM_RESNET_PARAMS = {20: 272_384, 32: 466_822, 44: 661_260, 56: 855_698, 110: 1_730_669,
                    164: 1_703_725}


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _num_k(model):
    # One (K,) vector lm_k per LM stage: K entries, one per LM step.
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights if "lm_k" in v.path)


@pytest.mark.parametrize("depth", sorted(LM_RESNET_PARAMS))
def test_lm_resnet_parameter_counts_match_reference(depth):
    lm = zoo.create_model(f"lm_resnet{depth}")
    assert _trainable(lm) == LM_RESNET_PARAMS[depth]
    plain = zoo.create_model(f"resnet{depth}")
    assert _trainable(plain) == LM_RESNET_PARAMS[depth] - _num_k(lm)
    # Heun / reversible Heun / momentum use the same residual functions: same count as ResNet.
    assert _trainable(zoo.create_model(f"heun_resnet{depth}")) == _trainable(plain)


def test_lm_resnet20_has_six_k():
    assert _num_k(zoo.create_model("lm_resnet20")) == 6


def test_registry_lists_every_family_and_depth():
    for family in ("resnet", "lm_resnet", "heun_resnet", "momentum_resnet", "revheun_resnet"):
        for depth in (20, 32, 44, 56, 110, 164, 1202, 18, 34, 50, 101, 152):
            assert f"{family}{depth}" in zoo.list_models()
    assert {"lm_resnet56_sd", "lm_resnet110_sd", "lm_resnext50_32x4d"} <= set(zoo.list_models())
    assert zoo.list_models("heun_resnet1*") == ["heun_resnet18", "heun_resnet101",
                                                "heun_resnet110", "heun_resnet152",
                                                "heun_resnet164", "heun_resnet1202"]


def test_keras_applications_signature():
    model = zoo.create_model("resnet20", include_top=False, pooling="max",
                             input_shape=(16, 16, 1), name="features")
    assert model.name == "features"
    assert model.output_shape == (None, 64)
    raw = zoo.create_model("resnet20", classes=3, classifier_activation=None,
                           input_shape=(8, 8, 1))
    out = raw.predict(np.ones((2, 8, 8, 1), "float32"), verbose=0)
    assert out.shape == (2, 3) and not np.allclose(out.sum(-1), 1.0)


def test_ode_step_size_option_reaches_stages():
    model = zoo.create_model("heun_resnet20", step_size="ode", input_shape=(8, 8, 1))
    assert model.get_layer("stage1").h == pytest.approx(1 / 2)  # 3 functions → 2 Heun steps
    assert model.get_layer("stage2").h == pytest.approx(1.0)  # 2 functions → 1 step


@pytest.mark.parametrize(
    "name, overrides, words",
    [
        ("lm_resnet21", {}, "did you mean lm_resnet20"),
        ("resnet20", {"depth": 21}, "6n+2"),
        ("resnet164", {"depth": 165}, "9n+2"),
        ("resnet50", {"depth": 51}, "ImageNet layout"),
        ("resnet20", {"input_shape": (4, 4, 3)}, ">= 8"),
        ("resnet50", {"input_shape": (16, 16, 3)}, ">= 32"),
        ("resnet20", {"classes": 0}, "classes"),
        ("resnet20", {"pooling": "sum", "include_top": False}, "pooling"),
        ("resnet20", {"weights": "/nonexistent/w.weights.h5"}, "does not exist"),
        ("resnet20", {"step_size": -1.0}, "step_size"),
        ("momentum_resnet20", {"integrator_config": {"gamma": 1.5}}, "gamma"),
        ("resnet20", {"colour": "red"}, "colour"),
        # Wrong types: the argument and what it takes, never an internal message.
        ("resnet20", {"depth": "20"}, "resnet20: depth must be an integer, got '20'"),
        ("resnet20", {"width_multiplier": "0.5"},
         "resnet20: width_multiplier must be a number, got '0.5'"),
        ("resnet20", {"width_multiplier": float("inf")},
         "width_multiplier must be a finite positive number, got inf"),
        ("resnet20", {"step_size": [1]}, "step_size must be a finite positive number or 'ode'"),
        ("resnet20", {"classes": "10"}, "resnet20: classes must be an integer, got '10'"),
        ("resnet20", {"include_top": "no"}, "include_top must be True or False, got 'no'"),
        ("resnet20", {"bottleneck": "yes"}, "bottleneck must be True or False or None"),
        ("resnet20", {"name": 3}, "resnet20: name must be a string or None, got 3"),
        ("keras_resnet50v2", {"classes": 1.5}, "classes must be an integer, got 1.5"),
        ("keras_resnet50v2", {"input_shape": (16, 16, 3)}, "height and width >= 32"),
        ("keras_resnet50", {"gradient": "adjoint"}, "needs a reversible integrator"),
    ],
)
def test_bad_input_raises_value_error_with_clear_message(name, overrides, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        zoo.create_model(name, **overrides)
    with pytest.raises(ValueError, match=re.escape(words)):  # the same, nothing built
        zoo.check_model(name, **overrides)


def test_check_model_builds_nothing_for_any_family(monkeypatch):
    import keras

    def no_building(*args, **kwargs):
        raise AssertionError("check_model built a layer")
    monkeypatch.setattr(keras.layers.Layer, "__call__", no_building)
    for family in zoo.list_families():
        zoo.check_model(zoo.list_models(family=family)[0])  # every builder stops after checks


def test_corrupt_and_mismatched_weights_files(tmp_path):
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"not an h5 file at all")
    with pytest.raises(KodeError, match="could not be loaded"):
        zoo.create_model("resnet20", input_shape=(8, 8, 1), weights=str(corrupt))
    source = zoo.create_model("resnet20", input_shape=(8, 8, 1), classes=5)
    good = tmp_path / "five.weights.h5"
    source.save_weights(good)
    with pytest.raises(KodeError, match="classes=10"):
        zoo.create_model("resnet20", input_shape=(8, 8, 1), weights=str(good))
    loaded = zoo.create_model("resnet20", input_shape=(8, 8, 1), classes=5, weights=str(good))
    x = np.ones((1, 8, 8, 1), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), source.predict(x, verbose=0))


def test_standard_fit_check_catches_a_stage_whose_gradient_is_zero(monkeypatch):
    """A broken adjoint (every stage variable's gradient zero, the input's still right) fails
    the zoo's standard fit check, naming the stage (in adjoint mode: the guard reports the
    same error, so the unchanged stage is what shows it), and an exact mode (checkpoint) so
    broken applies a gradient far from backprop's; the same model intact passes."""
    import tensorflow as tf

    from kode import gradients
    from kode.testing.models import check_fit_step

    def build():
        return zoo.create_model("resnet20", depth=8, input_shape=(8, 8, 3),
                                gradient="adjoint")

    check_fit_step(build())
    accumulate = gradients._accumulate
    monkeypatch.setattr(gradients, "_accumulate", lambda total, grads: accumulate(
        total, [None if g is None else tf.zeros_like(tf.convert_to_tensor(g)) for g in grads]))
    with pytest.raises(AssertionError, match=r"unchanged: .*\(stage "):
        check_fit_step(build(), ["adjoint"])
    with pytest.raises(AssertionError, match=r"checkpoint fit step applied a gradient"):
        check_fit_step(build(), ["checkpoint"])
