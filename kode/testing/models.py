"""The checks every zoo model passes (after keras-hub's shared model tests): build, one fit
step in each gradient mode with the applied gradient checked, configuration, ``.keras``,
SavedModel and checkpoint round trips, mixed precision, and golden outputs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile

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


def model_batch(model: keras.Model, size: int = 4, seed: int = 0):
    """``size`` seeded standard-normal inputs of ``model``'s input shape and labels 0, 1, …"""
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


@contextlib.contextmanager
def _left_as_found(model: keras.Model):
    """Every variable (weights, BN statistics, generator states), the gradient modes and the
    stochastic-depth survival of ``model`` restored after the block; stochastic-depth blocks
    kept (survival 1) inside it, so that a step is deterministic and no block rightly
    stays unchanged."""
    from kode.layers.stage import recomputable_layers
    from kode.tools.stages import integrator_stages

    variables = model.variables
    values = [np.array(v) for v in variables]
    modal = [*integrator_stages(model), *recomputable_layers(model)]
    modes = [layer.gradient for layer in modal]
    kept = _stochastic_depth_kept(model)
    try:
        yield
    finally:
        for layer, probability in kept:
            layer.survival_probability = probability
        for layer, mode in zip(modal, modes, strict=True):
            layer.gradient = mode
        for v, value in zip(variables, values, strict=True):
            v.assign(value)
        model.train_function = None  # traced with other modes or survival


def gradient_modes(model: keras.Model) -> list[str]:
    """The gradient modes ``model`` can train in: backprop and checkpoint always, the
    adjoint where every stage's integrator has a reversal."""
    from kode.gradients import ADJOINT, BACKPROP, CHECKPOINT
    from kode.tools.stages import integrator_stages

    stages = integrator_stages(model)
    reversible = bool(stages) and all(s.integrator.reversible for s in stages)
    return [BACKPROP, CHECKPOINT] + ([ADJOINT] if reversible else [])


def exact_gradient_mode(model: keras.Model, mode: str) -> bool:
    """Whether ``mode`` gives backprop's gradients up to rounding on ``model``: backprop,
    checkpoint, and the adjoint when every stage's reversal is exact."""
    from kode.gradients import ADJOINT
    from kode.integrators import EXACT
    from kode.tools.stages import integrator_stages

    return mode != ADJOINT or all(s.integrator.reversal == EXACT
                                  for s in integrator_stages(model))


#: SGD's learning rate in the fit check: a large step, so that (before − after) / lr is the
#: applied gradient to ~1e-7 relative (a small step's update drowns in the weights' rounding).
FIT_CHECK_LR = 100.0


def fit_step_gradients(model: keras.Model, x, y, mode: str) -> tuple[float, list[np.ndarray]]:
    """One compiled ``train_on_batch`` with SGD(:data:`FIT_CHECK_LR`) in gradient ``mode``:
    its loss and the gradient it applied, g = (w_before − w_after) / lr for every trainable
    tensor (float64). The model is left as found."""
    from kode.layers.stage import set_gradient_mode

    trainable = model.trainable_weights
    with _left_as_found(model):
        set_gradient_mode(model, mode)
        before = [np.array(w, dtype=np.float64) for w in trainable]
        model.compile(optimizer=keras.optimizers.SGD(FIT_CHECK_LR),
                      loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=False)
        loss = float(model.train_on_batch(x, y))
        applied = [(b - np.array(w, dtype=np.float64)) / FIT_CHECK_LR
                   for b, w in zip(before, trainable, strict=True)]
    return loss, applied


def check_fit_step(model: keras.Model, modes: list[str] | None = None) -> None:
    """One compiled SGD step in each gradient mode the model trains in (``modes``, default
    :func:`gradient_modes`) gives a finite loss and applies the right gradient: backprop's
    (an eager tape over the same forward, same weights) to 1e-4 relative where the mode is
    exact (:func:`exact_gradient_mode`), and where it is not (Euler/Heun-type adjoints) the
    very error the gradient guard reports for this batch, so that the guard's figure is the
    bound. Every trainable tensor the loss reaches moves; so does every stage variable (a
    stage whose adjoint returns zeros fails). The model is left as found.

    Stochastic-depth blocks are kept for the step (survival 1).
    """
    import tensorflow as tf

    from kode.layers.stage import IntegratorStage, set_gradient_mode
    from kode.tools.guard import check_gradients, model_gradients, relative_error

    x, y = model_batch(model)
    trainable = model.trainable_weights
    in_stage = {id(v): layer.name for layer in all_layers(model)
                if isinstance(layer, IntegratorStage) for v in layer.trainable_weights}
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    with _left_as_found(model):
        set_gradient_mode(model, "backprop")
        # In a tf.function as fit's step is (eager kernels round otherwise, and a batch-4
        # BatchNormalization over a 1×1 map amplifies it: 9 % on keras_resnet50).
        reference = [np.asarray(g, dtype=np.float64) for g in tf.function(
            lambda x, y: model_gradients(model, loss_fn, x, y))(x, y)]
    for mode in modes or gradient_modes(model):
        loss, applied = fit_step_gradients(model, x, y, mode)
        assert np.isfinite(loss), f"{model.name} ({mode}): non-finite loss {loss}"
        error = relative_error(applied, reference)
        if exact_gradient_mode(model, mode):
            assert error <= 1e-4, (
                f"{model.name}: the {mode} fit step applied a gradient {error:.3g} (relative) "
                "from backprop's")
        else:
            with _left_as_found(model):
                guard = check_gradients(model, x, y, mode=mode, points=1).model_error
            assert abs(error - guard) <= 0.1 * guard + 1e-4, (
                f"{model.name}: the {mode} fit step's gradient error {error:.3g} is not the "
                f"guard's figure {guard:.3g}")
        still = [(w, in_stage.get(id(w))) for w, g, ref in zip(trainable, applied, reference,
                                                                strict=True)
                 if (np.any(ref) or id(w) in in_stage) and not np.any(g)]
        assert not still, (
            f"{model.name} ({mode}): one SGD step left {len(still)}/{len(trainable)} trainable "
            "tensors unchanged: " + ", ".join(f"{w.path}" + (f" (stage {stage})" if stage
                                                             else "") for w, stage in still[:8]))


def _model_mode(model: keras.Model) -> str:
    from kode.tools.stages import integrator_stages

    (mode,) = {s.gradient for s in integrator_stages(model)} or {"backprop"}
    return mode


def check_keras_round_trip(model: keras.Model, directory: str) -> None:
    """``model.save`` → ``load_model``: the same class, weights, predictions and
    configuration (gradient modes and step sizes included: a stage saved in the adjoint that
    reloads in backprop fails)."""
    x, _ = model_batch(model, seed=1)
    path = os.path.join(directory, f"{model.name}.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is type(model)
    assert len(restored.weights) == len(model.weights)
    assert architecture(restored) == architecture(model), (
        f"{model.name}: the .keras round trip changed the configuration")
    # Eager calls: graph-mode inference is checked by the SavedModel round trip (CI time).
    np.testing.assert_allclose(restored(x, training=False), model(x, training=False),
                               atol=1e-6, err_msg=f"{model.name}: .keras round trip differs")


def check_config_round_trip(model: keras.Model) -> None:
    """``get_config`` → ``from_config`` → ``get_config`` gives the same configuration, and
    the rebuilt stages have the same gradient modes and step sizes."""
    from kode.tools.stages import integrator_stages

    rebuilt = type(model).from_config(model.get_config())
    assert architecture(rebuilt) == architecture(model), (
        f"{model.name}: get_config -> from_config -> get_config differs")
    assert [(s.gradient, s.h) for s in integrator_stages(rebuilt)] == [
        (s.gradient, s.h) for s in integrator_stages(model)], model.name


def check_savedmodel_round_trip(model: keras.Model, directory: str) -> None:
    """``export_model`` → ``tf.saved_model.load``: the served probabilities, read here from
    the loaded graph (not from the exporter's own check), are the Keras model's."""
    import tensorflow as tf

    from kode.serving.signatures import SIGNATURE_PREPROCESSED

    x, _ = model_batch(model, seed=2)
    result = export_model(model, os.path.join(directory, "saved_models"), check_inputs=x)
    assert os.path.isfile(os.path.join(result.path, "saved_model.pb"))
    served = tf.saved_model.load(result.path).signatures[SIGNATURE_PREPROCESSED]
    (key,) = served.structured_input_signature[1]
    outputs = served(**{key: tf.constant(x)})
    probabilities = np.asarray(outputs.get("probabilities", outputs.get("outputs")))
    expected = np.asarray(model(x, training=False))
    assert np.isfinite(expected).all(), f"{model.name}: non-finite Keras outputs"
    np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0,
                               err_msg=f"{model.name}: the SavedModel serves other numbers")


def run_standard_model_checks(name: str, every_mode: bool = True,
                              **extra_overrides) -> keras.Model:
    """Build ``name`` (reduced), then: output shape and probabilities, one fit step in each
    gradient mode (``every_mode=False``: in the model's own mode only), configuration,
    ``.keras``, SavedModel and ``tf.train.Checkpoint`` round trips (every variable restored
    exactly), and the headless feature extractor."""
    overrides = {**reduced_overrides(name), **extra_overrides}
    # Seeded: what ran before on the same worker must not choose the weights (a V1
    # ResNet-50's features reach 1e27-1e32 after a fit step at some initializations).
    keras.utils.set_random_seed(0)
    model = zoo.create_model(name, **overrides)
    x, _ = model_batch(model)
    probs = np.asarray(model(x, training=False))
    classes = overrides.get("classes", zoo.get_entry(name).defaults.get("classes", 10))
    assert probs.shape == (len(x), classes)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    check_fit_step(model, None if every_mode else [_model_mode(model)])
    check_config_round_trip(model)
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
