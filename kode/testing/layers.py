"""The contract every kode layer passes: Keras' own ``run_layer_test``, per-layer dtype
policies, and the ``tf.train.Checkpoint`` round trip."""

from __future__ import annotations

import importlib
import os
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from kode.compat import all_layers, keras_test_case

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
    """Add a layer to ``LAYER_CASES`` (call it from the layer module's ``*_test.py``)."""
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
    class Harness(keras_test_case()):
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


def load_layer_cases() -> list[LayerCase]:
    """Every registered case: imports each ``kode/layers/*_test.py`` (which registers its own)."""
    import kode.layers

    for module in pkgutil.iter_modules(kode.layers.__path__):
        if module.name.endswith("_test"):
            importlib.import_module(f"kode.layers.{module.name}")
    return list(LAYER_CASES)


def layer_contract_tests(cases: list[LayerCase]):
    """The pytest tests of a layer module's cases: ``test_keras_run_layer_test,
    test_per_layer_dtype_policy, test_checkpoint_round_trip = layer_contract_tests(CASES)``."""
    import pytest

    @pytest.mark.parametrize("case", cases, ids=str)
    def test_keras_run_layer_test(case):
        check_layer_test(case)

    @pytest.mark.parametrize("case", cases, ids=str)
    def test_per_layer_dtype_policy(case):
        check_layer_dtypes(case)

    @pytest.mark.parametrize("case", cases, ids=str)
    def test_checkpoint_round_trip(case):
        check_layer_checkpoint(case)

    return test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip


def check_layers_have_cases(model: keras.Model) -> None:
    """Every layer class of kode (or zoo) inside ``model`` is covered by a layer case."""
    covered = set()
    for case in load_layer_cases():
        covered.update(type(layer) for layer in all_layers(case.factory()))
    used = {type(layer) for layer in all_layers(model)}
    missing = sorted(cls.__qualname__ for cls in used - covered
                     if cls.__module__.split(".")[0] in ("kode", "zoo"))
    assert not missing, (f"{model.name} uses kode layers without a layer case: {missing}; "
                         "register them in the layer module's *_test.py")


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
