"""Shared model tests that every zoo model passes (after keras-hub's test helpers).

Models: ``reduced_overrides(name)`` shrinks a registered model to a size a CPU test can
afford while keeping its family, layout, block kind and options; ``run_standard_model_checks``
builds it, takes one fit step and round-trips it through ``.keras``, a SavedModel and a
``tf.train.Checkpoint`` (every variable, exactly), and checks that every kode layer class in it
has a layer case.

Layers: ``LAYER_CASES`` lists one small instance of every kode layer; ``run_layer_contract_checks``
runs Keras' own conformance harness (``run_layer_test``, mixed precision included), per-layer
float16/bfloat16/mixed policies (outputs and gradients in the compute dtype) and the
``tf.train.Checkpoint`` round trip into a fresh instance. A new layer adds itself with
``register_layer_case`` below (tests/test_layer_contracts.py runs every case)::

    def _my_block(dtype=None, **kwargs):       # kwargs: what run_layer_test passes (dtype…)
        return MyBlock(BasicBlock(4, dtype=dtype), dtype=dtype, **kwargs)  # sublayers follow
    register_layer_case("my_block", _my_block, input_shape=(2, 4, 4, 4))
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

import zoo
from kode.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth
from kode.export import export_model
from kode.normalization import BatchNormalization
from kode.port import LayerChain
from kode.stage import IntegratorStage, TransitionBlock
from zoo.revnet import HalvesPoolPad, RevNetDownsampleFunction

REDUCED_CIFAR_INPUT = (8, 8, 3)
REDUCED_IMAGENET_INPUT = (32, 32, 3)


def reduced_overrides(name: str) -> dict:
    """Builder overrides giving a small model of the same kind as ``name``.

    CIFAR: depth 20 stays (three blocks per stage), deeper basic layouts become
    depth 8, bottleneck ones depth 11. ImageNet: the depth-18 stage layout (2, 2, 2, 2) with the
    name's block kind (a transition and one integrator step per stage; bottlenecks for
    50/101/152), 1/16 width, 32×32 input.
    """
    defaults = zoo.get_entry(name).defaults
    depth, layout = defaults["depth"], defaults["layout"]
    if layout == "cifar":
        small = 11 if defaults.get("bottleneck") else (depth if depth <= 20 else 8)
        return {"depth": small, "input_shape": REDUCED_CIFAR_INPUT}
    bottleneck = defaults.get("bottleneck")
    return {"depth": 18, "bottleneck": depth >= 50 if bottleneck is None else bottleneck,
            "input_shape": REDUCED_IMAGENET_INPUT, "classes": 10, "width_multiplier": 1 / 16}


def _batch(model: keras.Model, size: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = tuple(model.input_shape[1:])
    x = rng.standard_normal((size, *shape)).astype("float32")
    classes = model.output_shape[-1]
    return x, np.arange(size) % classes


def check_fit_step(model: keras.Model) -> None:
    """One SGD step runs, gives a finite loss and changes the trainable weights."""
    x, y = _batch(model)
    before = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy",
                  jit_compile=False)
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss), f"{model.name}: non-finite loss {loss}"
    changed = sum(not np.array_equal(b, np.array(w))
                  for b, w in zip(before, model.trainable_weights, strict=True))
    assert changed >= len(before) // 2, f"{model.name}: only {changed}/{len(before)} weights moved"


def check_keras_round_trip(model: keras.Model, directory: str) -> None:
    x, _ = _batch(model, seed=1)
    path = os.path.join(directory, f"{model.name}.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is type(model)
    assert len(restored.weights) == len(model.weights)
    # Eager calls: graph-mode inference is checked by the SavedModel round trip (CI time).
    np.testing.assert_allclose(restored(x, training=False), model(x, training=False),
                               atol=1e-6, err_msg=f"{model.name}: .keras round trip differs")


def check_savedmodel_round_trip(model: keras.Model, directory: str) -> None:
    x, _ = _batch(model, seed=2)
    result = export_model(model, os.path.join(directory, "saved_models"), check_inputs=x)
    assert result.max_abs_diff <= 1e-5, f"{model.name}: SavedModel differs {result.max_abs_diff}"
    assert os.path.isfile(os.path.join(result.path, "saved_model.pb"))


def checkpointed_variables(obj: keras.layers.Layer) -> list:
    """Every variable whose value a checkpoint must keep: the weights and the random-generator
    states (which Keras keeps out of ``weights``)."""
    unique = {id(v): v for v in [*obj.weights, *obj.non_trainable_variables]}
    return list(unique.values())


def _shift(variables) -> None:
    for v in variables:
        v.assign(np.asarray(v) + np.ones(v.shape, dtype=np.dtype(v.dtype)))


def check_checkpoint_round_trip(obj: keras.layers.Layer, directory: str,
                                fresh: keras.layers.Layer | None = None) -> None:
    """``tf.train.Checkpoint(model=obj).write`` → ``read`` into ``fresh`` (same architecture,
    other initialization) restores every variable exactly.

    Without ``fresh``, ``obj`` itself is moved off the saved values (+1 on every variable)
    and read back: no second build, the same object-graph matching. With ``fresh``, every
    variable of ``obj`` is moved off (+1) before the write, so that one left out of the
    checkpoint cannot equal ``fresh``'s by chance.
    """
    source = checkpointed_variables(obj)
    target = source if fresh is None else checkpointed_variables(fresh)
    assert [tuple(v.shape) for v in source] == [tuple(v.shape) for v in target], (
        f"{obj.name}: the fresh copy has other variables")
    if fresh is not None:
        _shift(source)
    expected = [np.array(v) for v in source]
    path = tf.train.Checkpoint(model=obj).write(os.path.join(directory, "checkpoint", "ckpt"))
    if fresh is None:
        _shift(source)
    same = [v.path for v, e in zip(target, expected, strict=True) if np.array_equal(v, e)]
    assert not same, f"{obj.name}: the target already holds the saved values of {same[:3]}"
    status = tf.train.Checkpoint(model=obj if fresh is None else fresh).read(path)
    status.assert_existing_objects_matched().expect_partial()  # fresh has no optimizer
    lost = [v.path for v, e in zip(target, expected, strict=True)
            if not np.array_equal(np.asarray(v), e)]
    assert not lost, (f"{obj.name}: tf.train.Checkpoint lost {len(lost)} of {len(source)} "
                      f"variables, e.g. {lost[:3]}")


def run_standard_model_checks(name: str, **extra_overrides) -> keras.Model:
    """Build ``name`` (reduced), then: output shape and probabilities, one fit step,
    ``.keras`` round trip, SavedModel round trip, ``tf.train.Checkpoint`` round trip (every
    variable restored exactly), and the headless feature extractor."""
    overrides = {**reduced_overrides(name), **extra_overrides}
    model = zoo.create_model(name, **overrides)
    x, _ = _batch(model)
    probs = np.asarray(model(x, training=False))
    classes = overrides.get("classes", zoo.get_entry(name).defaults.get("classes", 10))
    assert probs.shape == (len(x), classes)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    check_fit_step(model)
    with tempfile.TemporaryDirectory() as directory:
        check_keras_round_trip(model, directory)
        check_savedmodel_round_trip(model, directory)
        check_checkpoint_round_trip(model, directory)
    features = zoo.create_model(name, include_top=False, pooling="avg", **overrides)
    assert len(features.output_shape) == 2
    check_layers_have_cases(model)
    return model


def architecture(model: keras.Model) -> str:
    """``model.get_config()`` as JSON without the names Keras makes up or the caller chooses
    (the model's, its input layers'): equal for two builds of the same architecture."""
    text = json.dumps({**model.get_config(), "name": None}, sort_keys=True, default=repr)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            text = text.replace(json.dumps(layer.name), json.dumps("<input>"))
    return text


def family_model_tests(family: str, min_models: int = 12,
                       overrides: Callable[[str], dict] | None = None):
    """The shared pytest tests of one family:
    ``test_family_is_registered, test_standard_model_checks, test_same_reduced_model = …``.

    ``overrides(name)`` adds builder overrides to :func:`reduced_overrides` (a family with its
    own depth form). Reduced, many names are one model (the CIFAR depths 32…1202 all become
    depth 8, ImageNet 50/101/152 one bottleneck layout): the standard checks run once per
    distinct reduced model, on its first name; every other name is built reduced and must be
    that same architecture (``test_same_reduced_model``), so the checks hold for it too.
    """
    import pytest

    names = zoo.list_models(family=family)

    def reduced(name: str) -> dict:
        return {**reduced_overrides(name), **(overrides(name) if overrides else {})}

    def same_model_key(name: str) -> str:  # what create_model(name, **reduced(name)) depends on
        entry = zoo.get_entry(name)
        config = {**entry.defaults, **reduced(name)}
        config.pop("name", None)
        return repr((entry.builder, sorted(config.items())))

    first: dict = {}
    for name in names:
        first.setdefault(same_model_key(name), name)
    checked = list(first.values())
    representative = {name: first[same_model_key(name)] for name in names}
    others = [name for name in names if representative[name] != name]

    @functools.cache
    def checked_architecture(name: str) -> str:
        return architecture(zoo.create_model(name, **reduced(name)))

    def test_family_is_registered():
        assert len(names) >= min_models, names

    @pytest.mark.parametrize("name", checked)
    def test_standard_model_checks(name):
        run_standard_model_checks(name, **(overrides(name) if overrides else {}))

    @pytest.mark.parametrize("name", others)
    def test_same_reduced_model(name):  # (None below when every reduced model is distinct)
        model = zoo.create_model(name, **reduced(name))
        assert model.name == name
        assert architecture(model) == checked_architecture(representative[name]), (
            f"{name} reduced is not the model {representative[name]} was checked as")

    return (test_family_is_registered, test_standard_model_checks,
            test_same_reduced_model if others else None)


def serving_contract(path: str) -> dict:
    """What a TF Serving client sees of a SavedModel: signature -> (inputs, output keys).

    ``inputs`` maps each input key to (dtype name, shape with None for unknown dims).
    """
    import tensorflow as tf

    contract = {}
    for name, fn in tf.saved_model.load(path).signatures.items():
        _, kwargs = fn.structured_input_signature
        inputs = {key: (spec.dtype.name, spec.shape.as_list()) for key, spec in kwargs.items()}
        contract[name] = (inputs, sorted(fn.structured_outputs))
    return contract


def image_serving_contract(shape: tuple[int, int, int]) -> dict:
    """The contract every kode export of an image classifier with input ``shape`` has."""
    batch = [None, *shape]
    outputs = ["class_ids", "probabilities"]
    return {
        "serving_default": ({"images": ("float32", batch)}, outputs),
        "serving_uint8": ({"images": ("uint8", batch)}, outputs),
        "serving_preprocessed": ({"images": ("float32", batch)}, outputs),
    }


# ---------------------------------------------------------------------------------------------
# Layer contracts: Keras' run_layer_test, per-layer dtype policies, tf.train.Checkpoint.

# Per-layer policies checked on every case (mixed_bfloat16 casts like mixed_float16).
DTYPE_POLICIES = ("float16", "bfloat16", "mixed_float16")


@dataclass(frozen=True)
class LayerCase:
    """One small kode layer for the contract checks.

    ``factory(**kwargs)`` returns a new, unbuilt layer; ``kwargs`` are what Keras'
    ``run_layer_test`` passes (``dtype`` among them): the factory hands ``dtype`` to the
    sublayers it creates, as a layer does with ``dtype=self.dtype_policy``.
    ``layer_test_kwargs`` go to ``run_layer_test`` (``call_kwargs``, ``expected_output_shape``…).
    """

    name: str
    factory: Callable[..., keras.layers.Layer]
    input_shape: tuple | list
    layer_test_kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:  # pytest ids
        return self.name


LAYER_CASES: list[LayerCase] = []


def register_layer_case(name: str, factory: Callable[..., keras.layers.Layer],
                        input_shape: tuple | list, **layer_test_kwargs) -> LayerCase:
    """Add a layer to ``LAYER_CASES`` (every case runs in tests/test_layer_contracts.py)."""
    if any(case.name == name for case in LAYER_CASES):
        raise ValueError(f"layer case '{name}' is already registered")
    case = LayerCase(name, factory, input_shape, dict(layer_test_kwargs))
    LAYER_CASES.append(case)
    return case


def _inputs(input_shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
        return type(input_shape)(_inputs(s, seed + i) for i, s in enumerate(input_shape))
    return rng.standard_normal(input_shape).astype("float32")


def _harness():
    from keras.src.testing import TestCase

    class Harness(TestCase):
        def runTest(self):  # noqa: N802  (unittest's name)
            pass

    return Harness()


def check_layer_test(case: LayerCase) -> None:
    """Keras' own conformance harness, every check on (serialization, build, symbolic and
    eager call, one compiled fit step, mixed precision)."""
    kwargs = {"run_training_check": True, "run_mixed_precision_check": True,
              **case.layer_test_kwargs}
    _harness().run_layer_test(case.factory, {}, input_shape=case.input_shape, **kwargs)


def check_layer_dtypes(case: LayerCase, policies=DTYPE_POLICIES) -> None:
    """With a per-layer dtype policy the outputs (inference and training) are in the layer's
    compute dtype, the gradients are finite and in each variable's dtype, and float weights
    are in the policy's variable dtype."""
    x = _inputs(case.input_shape)
    call_kwargs = case.layer_test_kwargs.get("call_kwargs", {})
    for policy in policies:
        layer = case.factory(dtype=policy)
        layer(x, **call_kwargs)
        with tf.GradientTape() as tape:
            outputs = tf.nest.flatten(layer(x, training=True, **call_kwargs))
            loss = tf.add_n([tf.reduce_sum(tf.cast(y, "float32")) for y in outputs])
        for y in [*outputs, *tf.nest.flatten(layer(x, training=False, **call_kwargs))]:
            assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype, (
                f"{case.name} with dtype={policy}: output {y.dtype}, not {layer.compute_dtype}")
        for w in layer.weights:
            if keras.backend.is_float_dtype(w.dtype):
                assert w.dtype == layer.variable_dtype, f"{case.name} {policy}: {w.path} {w.dtype}"
        variables = layer.trainable_variables
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads, strict=True):
            assert g is not None, f"{case.name} {policy}: no gradient for {v.path}"
            assert g.dtype == v.dtype, f"{case.name} {policy}: {v.path} gradient {g.dtype}"
            assert np.all(np.isfinite(np.asarray(tf.cast(g, "float32")))), (
                f"{case.name} {policy}: non-finite gradient for {v.path}")


def check_layer_checkpoint(case: LayerCase) -> None:
    """``tf.train.Checkpoint`` round trip into a fresh instance restores every variable."""
    x = _inputs(case.input_shape)
    call_kwargs = case.layer_test_kwargs.get("call_kwargs", {})
    layer, fresh = case.factory(), case.factory()
    for instance in (layer, fresh):
        instance(x, training=True, **call_kwargs)  # builds; moves BN statistics, generators
    with tempfile.TemporaryDirectory() as directory:
        check_checkpoint_round_trip(layer, directory, fresh=fresh)


def run_layer_contract_checks(case: LayerCase) -> None:
    """Every contract check on one layer case."""
    check_layer_test(case)
    check_layer_dtypes(case)
    check_layer_checkpoint(case)


def check_layers_have_cases(model: keras.Model) -> None:
    """Every layer class of kode (or zoo) inside ``model`` is covered by a layer case."""
    covered = set()
    for case in LAYER_CASES:
        covered.update(type(layer) for layer in _all_layers(case.factory()))
    used = {type(layer) for layer in _all_layers(model)}
    missing = sorted(cls.__qualname__ for cls in used - covered
                     if cls.__module__.split(".")[0] in ("kode", "zoo"))
    assert not missing, (f"{model.name} uses kode layers without a layer case: {missing}; add "
                         "them with kode.testing.register_layer_case")


def _all_layers(layer: keras.layers.Layer) -> list:
    return [layer, *layer._flatten_layers(include_self=False)]


# The kode layers. Small shapes: every case runs in seconds (a compiled fit step included).
_X = (2, 4, 4, 4)


def _stage(integrator, functions: int = 2, wrap=None, width: int = 4, **stage_kwargs):
    def make(dtype=None, **kwargs):
        fns = [BasicBlock(width, dtype=dtype) for _ in range(functions)]
        if wrap is not None:
            fns = [wrap(f, i, dtype) for i, f in enumerate(fns)]
        return IntegratorStage(fns, integrator, dtype=dtype, **stage_kwargs, **kwargs)
    return make


def _stochastic_depth(f, i, dtype):
    return StochasticDepth(f, 0.6, seed=i, dtype=dtype)


register_layer_case("basic_block", lambda **kw: BasicBlock(4, **kw), _X)
register_layer_case("bottleneck_grouped_stride2",
                    lambda **kw: Bottleneck(4, 8, stride=2, groups=2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))
register_layer_case("projection", lambda **kw: Projection(8, 2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))
register_layer_case(
    "stochastic_depth",
    lambda dtype=None, **kw: _stochastic_depth(BasicBlock(4, dtype=dtype), 0, dtype), _X)
register_layer_case(
    "transition",
    lambda dtype=None, **kw: TransitionBlock(BasicBlock(8, 2, dtype=dtype),
                                             Projection(8, 2, dtype=dtype), dtype=dtype, **kw),
    _X, expected_output_shape=((2, 2, 2, 8), (2, 2, 2, 8)))
register_layer_case("stage_euler", _stage("euler"), _X)
register_layer_case("stage_heun_ode_checkpoint",
                    _stage("heun", step_size="ode", gradient="checkpoint"), _X)
register_layer_case("stage_lm_history_checkpoint", _stage("lm", gradient="checkpoint"), (_X, _X),
                    expected_output_shape=_X)
register_layer_case("stage_momentum_adjoint", _stage("momentum", gradient="adjoint"), _X)
register_layer_case(
    "stage_reversible_heun_adjoint_stochastic_depth",
    _stage("reversible_heun", functions=3, wrap=_stochastic_depth, gradient="adjoint"), _X)
register_layer_case("stage_polynet", _stage("polynet", step_size="ode"), _X)
register_layer_case("stage_fractalnet_checkpoint", _stage("fractalnet", gradient="checkpoint"), _X)
register_layer_case("stage_revnet_adjoint", _stage("revnet", functions=4, width=2,
                                                   gradient="adjoint"), _X)
register_layer_case("fused_batch_norm", lambda **kw: BatchNormalization(momentum=0.9, **kw), _X)
register_layer_case(
    "layer_chain",
    lambda dtype=None, **kw: LayerChain(
        [BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype),
         keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)], dtype=dtype, **kw), _X)
register_layer_case("stage_of_layer_chains_euler", lambda dtype=None, **kw: IntegratorStage(
    [LayerChain([BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype),
                 keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)], dtype=dtype)
     for _ in range(2)], "euler", dtype=dtype, **kw), _X)
register_layer_case("revnet_halves_pool_pad", lambda **kw: HalvesPoolPad(8, 2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))
register_layer_case(
    "revnet_downsample_function",
    lambda dtype=None, **kw: RevNetDownsampleFunction(
        BasicBlock(4, 2, dtype=dtype), BasicBlock(4, dtype=dtype), 8, 2, dtype=dtype, **kw),
    _X, expected_output_shape=(2, 2, 2, 8))
register_layer_case("stage_post_activation_euler_checkpoint",
                    _stage("post_activation_euler", gradient="checkpoint"), _X)
