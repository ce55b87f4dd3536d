""""""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable

import keras
import numpy as np

import zoo
from kode.compat import all_layers
from kode.serving.export import export_model
from kode.testing.layers import check_checkpoint_round_trip, check_layers_have_cases

REDUCED_CIFAR_INPUT = (8, 8, 3)


REDUCED_IMAGENET_INPUT = (32, 32, 3)


KERAS_APPLICATIONS_MIN_INPUT = (32, 32, 3)  # keras.applications' ResNets refuse smaller


def reduced_overrides(name: str) -> dict:
    """Builder overrides giving a small model of the same kind as ``name``.

    CIFAR: depth 20 stays (three blocks per stage), deeper basic layouts become
    depth 8, bottleneck ones depth 11. ImageNet: the depth-18 stage layout (2, 2, 2, 2) with the
    name's block kind (a transition and one integrator step per stage; bottlenecks for
    50/101/152), 1/16 width, 32×32 input. keras.applications ports (no ``layout``: their
    stages and widths are fixed): the smallest input keras.applications accepts (32×32) and
    10 classes.
    """
    defaults = zoo.get_entry(name).defaults
    if "layout" not in defaults:
        return {"input_shape": KERAS_APPLICATIONS_MIN_INPUT, "classes": 10}
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


def _stochastic_depth_kept(model: keras.Model) -> list:
    """Every stochastic-depth block of ``model`` set to survival 1 (kept in training);
    returns ``(layer, probability)`` to restore."""
    from kode.layers.blocks import StochasticDepth

    changed = [(layer, layer.survival_probability) for layer in all_layers(model)
               if isinstance(layer, StochasticDepth)]
    for layer, _ in changed:
        layer.survival_probability = 1.0
    return changed


def check_fit_step(model: keras.Model) -> None:
    """One SGD step runs, gives a finite loss and moves every trainable tensor the loss has a
    gradient path to: every variable of every integrator stage (a stage whose gradient is
    zero, e.g. a broken adjoint, fails) and every other trainable tensor whose gradient (a tape
    over the same forward) is not None.

    Stochastic-depth blocks are kept for this step (survival 1): a dropped block's variables
    would rightly not move.
    """
    import tensorflow as tf

    from kode.layers.stage import IntegratorStage

    x, y = _batch(model)
    trainable = model.trainable_weights
    in_stage = {id(v): layer.name for layer in all_layers(model)
                if isinstance(layer, IntegratorStage) for v in layer.trainable_weights}
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    kept = _stochastic_depth_kept(model)
    try:
        with tf.GradientTape() as tape:  # which tensors the loss reaches (None: no path)
            loss = loss_fn(y, model(x, training=True))
        reached = [g is not None for g in tape.gradient(loss, trainable)]
        before = [np.array(w) for w in trainable]
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss_fn, jit_compile=False)
        loss = model.train_on_batch(x, y)
    finally:
        for layer, probability in kept:
            layer.survival_probability = probability
        model.train_function = None  # traced with survival 1
    assert np.isfinite(loss), f"{model.name}: non-finite loss {loss}"
    still = [(w, in_stage.get(id(w))) for w, b, path in zip(trainable, before, reached,
                                                            strict=True)
             if (path or id(w) in in_stage) and np.array_equal(b, np.array(w))]
    assert not still, (
        f"{model.name}: one SGD step left {len(still)}/{len(trainable)} trainable tensors "
        "unchanged: " + ", ".join(f"{w.path}" + (f" (stage {stage})" if stage else "")
                                  for w, stage in still[:8]))


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


def architecture(model: keras.Model, steps: bool = True) -> str:
    """``model.get_config()`` as JSON without the names Keras makes up or the caller chooses
    (the model's, its input layers'): equal for two builds of the same architecture.

    ``steps=False``: every integrator stage keeps only its first residual function and every
    layer name becomes its order of appearance (names number blocks by depth, e.g.
    ``conv4_block23_out``), so two models that differ only in their number of steps per stage
    (keras.applications ResNet50, 101 and 152) give the same text.
    """
    config = {**model.get_config(), "name": None}
    if not steps:
        from kode.layers.stage import IntegratorStage

        stage_class = keras.saving.get_registered_name(IntegratorStage)
        config["layers"] = [
            {**layer, "config": {**layer["config"], "residual_functions":
                                 layer["config"]["residual_functions"][:1]}}
            if stage_class in (layer.get("registered_name"), layer.get("class_name")) else layer
            for layer in config["layers"]]
    text = json.dumps(config, sort_keys=True, default=repr)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            text = text.replace(json.dumps(layer.name), json.dumps("<input>"))
    if not steps:
        names, order = {layer.name for layer in all_layers(model)}, {}
        text = re.sub(r'"((?:[^"\\]|\\.)*)"', lambda m: json.dumps(
            f"<layer {order.setdefault(m[1], len(order))}>") if m[1] in names else m[0], text)
    return text


def family_model_tests(family: str, min_models: int = 12,
                       overrides: Callable[[str], dict] | None = None,
                       same_up_to_steps: dict[str, str] | None = None):
    """The shared pytest tests of one family:
    ``test_family_is_registered, test_standard_model_checks, test_same_reduced_model = …``.

    ``overrides(name)`` adds builder overrides to :func:`reduced_overrides` (a family with its
    own depth form). Reduced, many names are one model (the CIFAR depths 32…1202 all become
    depth 8, ImageNet 50/101/152 one bottleneck layout): the standard checks run once per
    distinct reduced model, on its first name; every other name is built reduced and must be
    that same architecture (``test_same_reduced_model``), so the checks hold for it too.

    ``same_up_to_steps`` maps names to a checked name whose reduced architecture they have up
    to the number of steps per stage (:func:`architecture` with ``steps=False``): for families
    whose models cannot be reduced to one (keras.applications ResNet50/101/152, fixed layouts
    of 23–60M parameters), so that only one of each kind gets the (slow) standard checks.
    """
    import pytest

    names = zoo.list_models(family=family)
    like = dict(same_up_to_steps or {})
    unknown = sorted(set(like) - set(names)) + sorted(set(like.values()) - set(names))
    if unknown or set(like) & set(like.values()):
        raise ValueError(f"same_up_to_steps of {family}: {unknown or like} are not other "
                         "names of the family mapped to checked ones")

    def reduced(name: str) -> dict:
        return {**reduced_overrides(name), **(overrides(name) if overrides else {})}

    def same_model_key(name: str) -> str:  # what create_model(name, **reduced(name)) depends on
        entry = zoo.get_entry(name)
        config = {**entry.defaults, **reduced(name)}
        config.pop("name", None)
        return repr((entry.builder, sorted(config.items())))

    first: dict = {}
    for name in names:
        if name not in like:
            first.setdefault(same_model_key(name), name)
    checked = list(first.values())
    representative = {name: like.get(name) or first[same_model_key(name)] for name in names}
    others = [name for name in names if representative[name] != name]

    @functools.cache
    def checked_architecture(name: str, steps: bool) -> str:
        return architecture(zoo.create_model(name, **reduced(name)), steps=steps)

    def test_family_is_registered():
        assert len(names) >= min_models, names

    @pytest.mark.parametrize("name", checked)
    def test_standard_model_checks(name):
        run_standard_model_checks(name, **(overrides(name) if overrides else {}))

    @pytest.mark.parametrize("name", others)
    def test_same_reduced_model(name):  # (None below when every reduced model is distinct)
        model = zoo.create_model(name, **reduced(name))
        assert model.name == name
        steps = name not in like
        assert architecture(model, steps=steps) == checked_architecture(
            representative[name], steps), (
            f"{name} reduced is not the model {representative[name]} was checked as"
            + ("" if steps else " (up to its number of steps per stage)"))

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


_MIRRORED_FIT = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, zoo
name, policy, epochs, options = json.loads(sys.argv[1])
keras.mixed_precision.set_global_policy(policy)
x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype("float32")
y = np.arange(16) % 10
def run(strategy, mode):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = zoo.create_model(name, input_shape=(8, 8, 1), gradient=mode, **options)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy",
                      jit_compile=False)
    return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0).history["loss"]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(json.dumps({mode: run(strategy, mode) for mode in ("adjoint", "backprop")}))
"""


def mirrored_fit_losses(name: str = "revheun_resnet20", policy: str = "float32",
                        epochs: int = 3, **options) -> dict[str, list[float]]:
    """Per-epoch losses of ``name`` (8×8×1 digits-sized input, the same seed and batches)
    trained with the adjoint and with backprop under a ``MirroredStrategy`` over two logical
    CPU devices. Runs in a fresh process: logical devices must be configured before
    TensorFlow initializes its runtime."""
    import subprocess
    import sys

    arguments = json.dumps([name, policy, epochs, options])
    result = subprocess.run([sys.executable, "-c", _MIRRORED_FIT, arguments],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def smooth_dense_stage(num_functions: int, integrator: str, dtype: str = "float64",
                       width: int = 8, seed: int = 0):
    """An integrator stage whose weights are smooth in depth, h = 1/N:
    f_n(x) = tanh(x W(t_n) + b(t_n)), W(t) = A + sin(3t) B + cos(2t) C (A, B, C drawn with
    ``seed``), b(t) = 0.1 t, t_n = n / (N − 1): the regime where the Euler and Heun adjoints'
    errors fall like 1/N and 1/N² (Sander et al. 2022)."""
    from kode.layers.stage import IntegratorStage

    rng = np.random.default_rng(seed)
    a, b, c = rng.standard_normal((3, width, width)) / np.sqrt(width)
    fns = []
    for n in range(num_functions):
        t = n / max(num_functions - 1, 1)
        w = a + np.sin(3 * t) * b + np.cos(2 * t) * c
        fns.append(keras.layers.Dense(width, activation="tanh", dtype=dtype,
                                      kernel_initializer=keras.initializers.Constant(w),
                                      bias_initializer=keras.initializers.Constant(0.1 * t)))
    return IntegratorStage(fns, integrator, step_size="ode", dtype=dtype)


def smooth_dense_classifier(num_functions: int, integrator: str, dtype: str = "float64",
                            width: int = 8, seed: int = 0, classes: int = 3):
    """Input (width,) → :func:`smooth_dense_stage` → a softmax Dense head whose weights are
    drawn after the stage's with ``seed``: the same weights in every ``dtype`` or policy."""
    rng = np.random.default_rng(seed)
    rng.standard_normal((3, width, width))  # the stage's draws: the head's come after them
    inputs = keras.Input((width,))
    x = smooth_dense_stage(num_functions, integrator, dtype, width, seed)(inputs)
    head = keras.layers.Dense(classes, activation="softmax", dtype=dtype,
                              kernel_initializer=keras.initializers.Constant(
                                  rng.standard_normal((width, classes))))
    return keras.Model(inputs, head(x))
