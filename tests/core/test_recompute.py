"""Recomputation outside the stages (transitions, a ported model's stem / shape-changing
segments / head) under the memory-saving gradient modes: same gradients, one statistics
update, the same random draws, actually recomputed, and kept through save, port and refine."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import kode
import zoo
from kode.gradients import recompute
from kode.layers import (
    BasicBlock,
    Projection,
    RecomputedSegment,
    TransitionBlock,
    recomputable_layers,
    set_gradient_mode,
)
from kode.scopes import precision_scope
from kode.testing.models import REDUCED_CIFAR_INPUT, reduced_overrides
from kode.tools.guard import check_gradients
from kode.tools.port import port_model
from kode.tools.refine import refine
from zoo.registry import family_integrator

LOSS = keras.losses.SparseCategoricalCrossentropy()


def _batch(shape, size=4, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.standard_normal((size, *shape)), dtype),
            tf.constant(np.arange(size) % 10))


def _gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    return tape.gradient(loss, model.trainable_variables)


def _relative(a, b) -> float:
    a = tf.concat([tf.reshape(t, [-1]) for t in a], 0)
    b = tf.concat([tf.reshape(t, [-1]) for t in b], 0)
    return float(tf.norm(a - b) / tf.norm(b))


def _state(model):
    return [v.numpy().copy() for v in model.non_trainable_variables]


def _reset(model, state):
    for v, s in zip(model.non_trainable_variables, state, strict=True):
        v.assign(s)


def _families():
    return [f for f in zoo.list_families() if f != "keras_resnet"]


@pytest.mark.parametrize("family", _families())
def test_recomputing_the_transitions_leaves_every_familys_gradients_unchanged(family):
    """Whole-model recomputation vs the stages-only mode: equal to float32 rounding (≤ 1e-6);
    the exact-reversal families' adjoint vs backprop ≤ 1e-5."""
    integrator = family_integrator(family)()
    mode = "adjoint" if integrator.reversible else "checkpoint"
    names = zoo.list_models(family=family)
    name = next((n for n in names if zoo.get_entry(n).defaults.get("layout") == "cifar"),
                names[0])
    overrides = reduced_overrides(name)
    if family == "revnet":
        overrides["depth"] = 14  # RevNet's CIFAR form is 12n + 2
    shape = overrides["input_shape"]
    keras.utils.set_random_seed(0)
    model = zoo.create_model(name, gradient=mode, **overrides)
    transitions = recomputable_layers(model)
    assert transitions and all(t.gradient == mode for t in transitions)
    x, y = _batch(shape)
    state = _state(model)
    whole = _gradients(model, x, y)
    whole_state = _state(model)
    _reset(model, state)
    set_gradient_mode(model, mode, recompute=False)
    assert all(t.gradient == "backprop" for t in transitions)
    stages_only = _gradients(model, x, y)
    assert all(np.array_equal(a, b) for a, b in zip(whole_state, _state(model), strict=True)), \
        "the recomputation updated the batch-norm statistics a second time"
    assert _relative(whole, stages_only) <= 1e-6
    if integrator.reversal == "exact":
        _reset(model, state)
        set_gradient_mode(model, "backprop")
        assert _relative(whole, _gradients(model, x, y)) <= 1e-5


class _Counting(keras.layers.Layer):
    """The identity, counting its calls (eager)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("mode, calls", [("backprop", 1), ("checkpoint", 2), ("adjoint", 2)])
def test_a_transition_is_recomputed_in_the_backward_only_in_memory_saving_modes(mode, calls):
    counter = _Counting()
    block = TransitionBlock(keras.Sequential([counter, BasicBlock(8, 2)]), Projection(8, 2),
                            gradient=mode)
    x = tf.random.normal((2, 8, 8, 4))
    block(x)  # build
    counter.calls = 0
    with tf.GradientTape() as tape:
        out, _ = block(x, training=True)
        loss = tf.reduce_sum(out ** 2)
    tape.gradient(loss, block.trainable_variables)
    assert counter.calls == calls


def test_recompute_replays_the_random_draws_of_stochastic_depth():
    """A stochastic-depth transition: the recomputation drops the same blocks as the forward,
    so its gradients equal backprop's from the same generator state."""
    keras.utils.set_random_seed(1)
    model = zoo.create_model("lm_resnet20", input_shape=REDUCED_CIFAR_INPUT,
                             gradient="checkpoint", final_survival_probability=0.5)
    x, y = _batch(REDUCED_CIFAR_INPUT)
    state = _state(model)
    recomputed = _gradients(model, x, y)
    _reset(model, state)
    set_gradient_mode(model, "backprop")
    assert _relative(recomputed, _gradients(model, x, y)) <= 1e-6


def test_nested_recompute_runs_plainly_inside_an_outer_one():
    counter = _Counting()

    def inner(t):
        counter(t)
        return t * 2.0

    x = tf.constant([1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = recompute(lambda t: recompute(inner, t) + 1.0, x)
    assert tape.gradient(y, x).numpy().tolist() == [2.0, 2.0]
    assert counter.calls == 2  # forward + one recomputation, not three


@pytest.fixture(scope="module")
def ported():
    with precision_scope("float64"):
        keras.utils.set_random_seed(0)
        source = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3),
                                               classes=10)
        model = port_model(source, gradient="checkpoint")
    return source, model


def test_port_cuts_stem_shape_changing_blocks_and_head_into_segments(ported):
    source, model = ported
    kinds = [(layer.name, type(layer).__name__) for layer in model.layers[1:]]
    assert kinds == [("stem", "RecomputedSegment"), ("conv2_stage", "IntegratorStage"),
                     ("transition1", "RecomputedSegment"), ("conv3_stage", "IntegratorStage"),
                     ("transition2", "RecomputedSegment"), ("conv4_stage", "IntegratorStage"),
                     ("transition3", "RecomputedSegment"), ("conv5_stage", "IntegratorStage"),
                     ("head", "RecomputedSegment")]
    x, _ = _batch((32, 32, 3), dtype="float64")
    for training in (False, True):
        np.testing.assert_array_equal(model(x, training=training), source(x, training=training))
    flat = port_model(source, segments=False)
    assert not recomputable_layers(flat)


def test_recomputed_segments_give_the_stored_activations_gradients(ported):
    """float64: the cut model's checkpoint gradients (segments recomputed) equal backprop of
    the source model to rounding, and BN statistics are updated once."""
    source, model = ported
    x, y = _batch((32, 32, 3), dtype="float64")
    state = _state(model)
    got = _gradients(model, x, y)
    after = _state(model)
    _reset(model, state)
    want = _gradients(source, x, y)
    assert _relative(got, want) <= 1e-10
    assert all(np.array_equal(a, b) for a, b in zip(after, _state(source), strict=True))
    _reset(model, state)


def test_segments_survive_save_and_refine(ported, tmp_path):
    _, model = ported
    x, _ = _batch((32, 32, 3), dtype="float64")
    model.save(tmp_path / "cut.keras")
    loaded = keras.saving.load_model(tmp_path / "cut.keras")
    assert [type(layer).__name__ for layer in loaded.layers] == \
        [type(layer).__name__ for layer in model.layers]
    assert {layer.gradient for layer in recomputable_layers(loaded)} == {"checkpoint"}
    np.testing.assert_array_equal(loaded(x), model(x))
    np.testing.assert_allclose(refine(model, 1)(x), model(x), atol=1e-12)
    refined = recomputable_layers(refine(model, 2))
    assert [layer.name for layer in refined] == \
        [layer.name for layer in recomputable_layers(model)]
    for copy, source in zip(refined, recomputable_layers(model), strict=True):
        for a, b in zip(copy.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_segment_needs_one_input():
    a, b = keras.Input((2,)), keras.Input((2,))
    with pytest.raises(ValueError, match="one input"):
        RecomputedSegment(keras.Model([a, b], keras.layers.Add()([a, b])))


def test_the_guard_reports_what_is_recomputed_outside_the_stages():
    keras.utils.set_random_seed(0)
    model = zoo.create_model("revheun_resnet20", input_shape=REDUCED_CIFAR_INPUT,
                             gradient="adjoint")
    x, y = _batch(REDUCED_CIFAR_INPUT)
    report = check_gradients(model, x, y, points=1)
    assert report.recomputed == ("stage2_transition", "stage3_transition")
    assert "2 of 2 layers (stem, transitions, head) recomputed" in report.format()
    assert report.model_error <= 1e-5
    set_gradient_mode(model, "adjoint", recompute=False)
    report = check_gradients(model, x, y, points=1)
    assert report.recomputed == () and "0 of 2 layers" in report.format()


def test_cut_at_stages_gives_a_zoo_imagenet_model_a_recomputed_stem():
    """The zoo's ImageNet stem (conv 7×7/2, BN, ReLU, max-pool) stays plain layers in the
    built model; ``cut_at_stages`` makes it (and the transitions, head) segments: same
    function, checkpoint gradients equal backprop's, the nested transitions recomputed once."""
    keras.utils.set_random_seed(0)
    model = zoo.create_model("resnet18", **reduced_overrides("resnet18"))
    cut = kode.cut_at_stages(model, gradient="checkpoint")
    assert [layer.name for layer in cut.layers if isinstance(layer, RecomputedSegment)] == \
        ["stem", "transition1", "transition2", "transition3", "head"]
    x, y = _batch((32, 32, 3))
    np.testing.assert_array_equal(cut(x), model(x))
    set_gradient_mode(cut, "checkpoint")
    state = _state(cut)
    recomputed = _gradients(cut, x, y)
    _reset(cut, state)
    set_gradient_mode(cut, "backprop")
    assert _relative(recomputed, _gradients(cut, x, y)) <= 1e-6
