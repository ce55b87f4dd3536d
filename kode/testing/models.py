""""""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable

import keras
import numpy as np

import zoo
from kode.serving.export import export_model
from kode.testing.layers import check_checkpoint_round_trip, check_layers_have_cases

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
