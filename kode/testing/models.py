"""The checks every zoo model passes (after keras-hub's shared model tests): build, one fit
step in each gradient mode with the applied gradient checked, configuration, ``.keras``,
SavedModel and checkpoint round trips, mixed precision, and golden outputs."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import pkgutil
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

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

    from kode.layers.stage import IntegratorStage
    from kode.tools.guard import check_gradients, model_gradients, relative_error

    x, y = _batch(model)
    trainable = model.trainable_weights
    in_stage = {id(v): layer.name for layer in all_layers(model)
                if isinstance(layer, IntegratorStage) for v in layer.trainable_weights}
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    with _left_as_found(model):
        from kode.layers.stage import set_gradient_mode

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
                guard = check_gradients(model, x, y, mode=mode).model_point_errors[0]
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


def check_keras_round_trip(model: keras.Model, directory: str) -> None:
    """``model.save`` → ``load_model``: the same class, weights, predictions and
    configuration (gradient modes and step sizes included: a stage saved in the adjoint that
    reloads in backprop fails)."""
    x, _ = _batch(model, seed=1)
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

    x, _ = _batch(model, seed=2)
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


def check_mixed_precision(model_name: str, **overrides) -> None:
    """Built under ``mixed_bfloat16`` and ``mixed_float16`` (no training): float32 weights,
    integrator stages computing in the policy's dtype, finite float32 probabilities that sum
    to 1, in inference and training mode."""
    from kode.scopes import precision_scope
    from kode.tools.stages import integrator_stages

    for policy in ("mixed_bfloat16", "mixed_float16"):
        with precision_scope(policy):
            keras.utils.set_random_seed(0)
            model = zoo.create_model(model_name, **overrides)
        compute = policy.removeprefix("mixed_")
        x, _ = _batch(model)
        for training in (False, True):
            probs = model(x, training=training)
            assert keras.backend.standardize_dtype(probs.dtype) == "float32", (
                f"{model_name} {policy}: outputs {probs.dtype}")
            probs = np.asarray(probs)
            assert np.isfinite(probs).all(), f"{model_name} {policy}: non-finite outputs"
            np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-3)
        assert all(w.dtype == "float32" for w in model.weights
                   if keras.backend.is_float_dtype(w.dtype)), f"{model_name} {policy}"
        stages = integrator_stages(model)
        assert stages and all(s.compute_dtype == compute for s in stages), (
            f"{model_name} {policy}: stages compute in "
            f"{sorted({s.compute_dtype for s in stages})}")


def run_standard_model_checks(name: str, **extra_overrides) -> keras.Model:
    """Build ``name`` (reduced), then: output shape and probabilities, one fit step,
    ``.keras`` round trip, SavedModel round trip, ``tf.train.Checkpoint`` round trip (every
    variable restored exactly), and the headless feature extractor."""
    overrides = {**reduced_overrides(name), **extra_overrides}
    # Seeded: what ran before on the same worker must not choose the weights (a V1
    # ResNet-50's features reach 1e27-1e32 after a fit step at some initializations).
    keras.utils.set_random_seed(0)
    model = zoo.create_model(name, **overrides)
    x, _ = _batch(model)
    probs = np.asarray(model(x, training=False))
    classes = overrides.get("classes", zoo.get_entry(name).defaults.get("classes", 10))
    assert probs.shape == (len(x), classes)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    check_fit_step(model)
    check_config_round_trip(model)
    with tempfile.TemporaryDirectory() as directory:
        check_keras_round_trip(model, directory)
        check_savedmodel_round_trip(model, directory)
        check_checkpoint_round_trip(model, directory)
    features = zoo.create_model(name, include_top=False, pooling="avg", **overrides)
    assert len(features.output_shape) == 2
    check_layers_have_cases(model)
    return model


#: family → (model name, builder overrides) of its golden-output model: the first model its
#: standard checks run on, reduced (filled by :func:`family_model_tests`).
GOLDEN_CASES: dict[str, tuple[str, dict]] = {}

#: the golden outputs, written by tests/fixtures/make_zoo_outputs.py.
ZOO_OUTPUTS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "zoo_outputs.json"


def set_seeded_weights(model: keras.Model, seed: int = 0) -> None:
    """Every float variable of ``model`` drawn from ``numpy.random.default_rng(seed)`` in the
    order of ``model.variables`` (independent of Keras' initializers and layer names):
    kernels N(0, 1/fan_in), BN γ = 1 + 0.1·N(0, 1), moving variance 1 + 0.2·U(0, 1), β,
    moving mean and biases 0.1·N(0, 1), any other variable (LM's k_n…) its value + 0.05·N(0, 1)."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if not keras.backend.is_float_dtype(v.dtype):
            continue
        shape, kind = tuple(v.shape), v.path.rsplit("/", 1)[-1]
        noise = rng.standard_normal(shape)
        if kind == "kernel":
            value = noise / np.sqrt(max(int(np.prod(shape[:-1])), 1))
        elif kind == "moving_variance":
            value = 1.0 + 0.2 * rng.uniform(size=shape)
        elif kind == "gamma":
            value = 1.0 + 0.1 * noise
        elif kind in ("beta", "moving_mean", "bias"):
            value = 0.1 * noise
        else:
            value = np.asarray(v) + 0.05 * noise
        v.assign(value.astype(np.dtype(v.dtype)))


def golden_outputs(name: str, overrides: dict) -> list[float]:
    """8 numbers of model ``name`` (``overrides`` applied) with :func:`set_seeded_weights`:
    the first 4 class probabilities of 2 seeded inputs, in inference mode."""
    model = zoo.create_model(name, **overrides)
    set_seeded_weights(model)
    x = np.random.default_rng(1).standard_normal((2, *model.input_shape[1:])).astype("float32")
    return [float(p) for p in np.asarray(model(x, training=False))[:, :4].ravel()]


def load_family_tests() -> dict[str, tuple[str, dict]]:
    """:data:`GOLDEN_CASES` of every family: imports each ``zoo/<family>/*_test.py``."""
    for module in pkgutil.walk_packages(zoo.__path__, "zoo."):
        if module.name.endswith("_test"):
            importlib.import_module(module.name)
    return dict(GOLDEN_CASES)


def check_golden_outputs(family: str) -> None:
    """The family's golden model gives the stored outputs to 1e-5: a wiring change that keeps
    every shape (a swapped branch, a missing scale) changes them."""
    name, overrides = GOLDEN_CASES[family]
    stored = json.loads(ZOO_OUTPUTS.read_text())
    assert family in stored, (f"{family}: no golden outputs in {ZOO_OUTPUTS.name}; run "
                              "python tests/fixtures/make_zoo_outputs.py")
    want = stored[family]
    assert want["model"] == name and want["overrides"] == json.loads(json.dumps(overrides)), (
        f"{family}: the golden model changed ({want['model']} {want['overrides']}); "
        "regenerate with python tests/fixtures/make_zoo_outputs.py and say why")
    np.testing.assert_allclose(golden_outputs(name, overrides), want["outputs"], atol=1e-5,
                               rtol=0, err_msg=f"{family}: {name}'s outputs changed")


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
    """The shared pytest tests of one family: ``test_family_is_registered,
    test_standard_model_checks, test_same_reduced_model, test_mixed_precision,
    test_golden_outputs = …``.

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

    golden_name = checked[0]
    GOLDEN_CASES[family] = (golden_name, reduced(golden_name))

    def test_family_is_registered():
        assert len(names) >= min_models, names

    def test_mixed_precision():
        check_mixed_precision(golden_name, **reduced(golden_name))

    def test_golden_outputs():
        check_golden_outputs(family)

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
            test_same_reduced_model if others else None, test_mixed_precision,
            test_golden_outputs)


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
