"""Shared model tests that every zoo model passes (after keras-hub's test helpers).

``reduced_overrides(name)`` shrinks a registered model to a size a CPU test can afford
while keeping its family, layout, block kind and options; ``run_standard_model_checks``
builds it, takes one fit step and round-trips it through ``.keras``, a SavedModel and a
``tf.train.Checkpoint`` (every variable, exactly).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import zoo
from kode.export import export_model

REDUCED_CIFAR_INPUT = (8, 8, 3)
REDUCED_IMAGENET_INPUT = (32, 32, 3)


def reduced_overrides(name: str) -> dict:
    """Builder overrides giving a small model of the same kind as ``name``."""
    defaults = zoo.get_entry(name).defaults
    depth, layout = defaults["depth"], defaults["layout"]
    if layout == "cifar":
        small = 11 if defaults.get("bottleneck") else (depth if depth <= 20 else 8)
        return {"depth": small, "input_shape": REDUCED_CIFAR_INPUT}
    small = 50 if depth >= 50 else 18
    return {"depth": small, "input_shape": REDUCED_IMAGENET_INPUT, "classes": 10,
            "width_multiplier": 1 / 16}


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
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
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
    probs = model.predict(x, verbose=0)
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
    return model


def family_model_tests(family: str, min_models: int = 12, distinct_only: bool = False,
                       overrides: Callable[[str], dict] | None = None):
    """The shared pytest tests of one family: ``test_registered, test_models = …``.

    ``overrides(name)`` adds builder overrides to :func:`reduced_overrides` (a family with its
    own depth form); ``distinct_only`` checks one name per distinct reduced model (the CIFAR
    depths 32…1202 all shrink to the same model) to keep CI time down.
    """
    import pytest

    names = zoo.list_models(family=family)

    def reduced(name: str) -> dict:
        return {**reduced_overrides(name), **(overrides(name) if overrides else {})}

    checked = names
    if distinct_only:
        seen: dict = {}
        for name in names:
            key = repr(sorted({**zoo.get_entry(name).defaults, **reduced(name)}.items()
                              - {("name", name)}))
            seen.setdefault(key, name)
        checked = list(seen.values())

    def test_family_is_registered():
        assert len(names) >= min_models, names

    @pytest.mark.parametrize("name", checked)
    def test_standard_model_checks(name):
        run_standard_model_checks(name, **(overrides(name) if overrides else {}))

    return test_family_is_registered, test_standard_model_checks


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
