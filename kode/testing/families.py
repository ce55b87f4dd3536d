"""Every zoo family's shared tests (after keras-hub's): :func:`family_model_tests` gives a
family's ``*_test.py`` its tests, the standard checks of :mod:`kode.testing.models` on each
distinct reduced model, the mixed-precision dtype check and the golden outputs."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

import zoo
from kode.testing.models import (
    architecture,
    check_config_round_trip,
    model_batch,
    reduced_overrides,
    run_standard_model_checks,
)


def check_mixed_precision(model_name: str, **overrides) -> None:
    """Built under ``mixed_bfloat16`` and ``mixed_float16`` (no training): float32 weights,
    integrator stages computing in the policy's dtype, finite probabilities in that dtype (as
    keras.applications' classifiers give them) that sum to 1 within its rounding, in
    inference and training mode."""
    from kode.scopes import precision_scope
    from kode.tools.stages import integrator_stages

    for policy in ("mixed_bfloat16", "mixed_float16"):
        with precision_scope(policy):
            keras.utils.set_random_seed(0)
            model = zoo.create_model(model_name, **overrides)
        compute = policy.removeprefix("mixed_")
        x, _ = model_batch(model)
        for training in (False, True):
            probs = model(x, training=training)
            assert keras.backend.standardize_dtype(probs.dtype) == compute, (
                f"{model_name} {policy}: outputs {probs.dtype}")
            probs = np.asarray(keras.ops.cast(probs, "float32"))
            assert np.isfinite(probs).all(), f"{model_name} {policy}: non-finite outputs"
            np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=2e-2)
        assert all(w.dtype == "float32" for w in model.weights
                   if keras.backend.is_float_dtype(w.dtype)), f"{model_name} {policy}"
        stages = integrator_stages(model)
        assert stages and all(s.compute_dtype == compute for s in stages), (
            f"{model_name} {policy}: stages compute in "
            f"{sorted({s.compute_dtype for s in stages})}")


#: family → (model name, builder overrides) of its golden-output model: the first model its
#: standard checks run on, reduced (filled by :func:`family_model_tests`).
GOLDEN_CASES: dict[str, tuple[str, dict, Callable]] = {}

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
    keras.utils.set_random_seed(0)  # the initial values set_seeded_weights perturbs
    model = zoo.create_model(name, **overrides)
    set_seeded_weights(model)
    x = np.random.default_rng(1).standard_normal((2, *model.input_shape[1:])).astype("float32")
    return [float(p) for p in np.asarray(model(x, training=False))[:, :4].ravel()]


def load_family_tests() -> dict[str, tuple[str, dict, Callable]]:
    """:data:`GOLDEN_CASES` of every family: imports each ``zoo/<family>/*_test.py``."""
    for module in pkgutil.walk_packages(zoo.__path__, "zoo."):
        if module.name.endswith("_test"):
            importlib.import_module(module.name)
    return dict(GOLDEN_CASES)


def check_golden_outputs(family: str) -> None:
    """The family's golden model gives the stored outputs to 1e-5: a wiring change that keeps
    every shape (a swapped branch, a missing scale) changes them."""
    name, overrides, within = GOLDEN_CASES[family]
    stored = json.loads(ZOO_OUTPUTS.read_text())
    assert family in stored, (f"{family}: no golden outputs in {ZOO_OUTPUTS.name}; run "
                              "python tests/fixtures/make_zoo_outputs.py")
    want = stored[family]
    assert want["model"] == name and want["overrides"] == json.loads(json.dumps(overrides)), (
        f"{family}: the golden model changed ({want['model']} {want['overrides']}); "
        "regenerate with python tests/fixtures/make_zoo_outputs.py and say why")
    with within():
        outputs = golden_outputs(name, overrides)
    np.testing.assert_allclose(outputs, want["outputs"], atol=1e-5, rtol=0,
                               err_msg=f"{family}: {name}'s outputs changed")


def family_model_tests(family: str, min_models: int = 12,
                       overrides: Callable[[str], dict] | None = None,
                       same_up_to_steps: dict[str, str] | None = None,
                       within: Callable[[], contextlib.AbstractContextManager] = (
                           contextlib.nullcontext),
                       every_layout: bool = False, standard: Sequence[str] = ()):
    """The shared pytest tests of one family: ``(test_family_is_registered,
    test_standard_model_checks, test_same_reduced_model, test_mixed_precision,
    test_golden_outputs, test_other_layouts_build) = …``.

    ``overrides(name)`` adds builder overrides to :func:`reduced_overrides` (a family with its
    own depth form). Reduced, many names are one model (the CIFAR depths 32…1202 all become
    depth 8, ImageNet 50/101/152 one bottleneck layout): the standard checks run once per
    distinct reduced model, on its first name; every other name is built reduced and must be
    that same architecture (``test_same_reduced_model``), so the checks hold for it too.

    ``same_up_to_steps`` maps names to a checked name whose reduced architecture they have up
    to the number of steps per stage (:func:`architecture` with ``steps=False``): for families
    whose models cannot be reduced to one (keras.applications ResNet50/101/152, fixed layouts
    of 23–60M parameters), so that only one of each kind gets the (slow) standard checks.

    The layouts (CIFAR and ImageNet, basic and bottleneck blocks) are the shared builder's:
    the standard checks run on every distinct reduced model where ``every_layout`` (the
    ``resnet`` family), elsewhere on the names in ``standard`` (default: the family's first
    model), and its other distinct models are built, called and round-tripped through their
    configuration (``test_other_layouts_build``, CI time). The first standard name is the
    golden-output model and takes the fit step in every gradient mode.

    ``within()``: a context every model of the family is built in (keras_resnet: tiny
    same-shaped keras.applications builders,
    :func:`kode.testing.applications.tiny_keras_applications`).
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
        with within():
            return architecture(zoo.create_model(name, **reduced(name)), steps=steps)

    standard = list(checked if every_layout else standard or checked[:1])
    if not set(standard) <= set(checked):
        raise ValueError(f"standard names of {family}: {sorted(set(standard) - set(checked))} "
                         f"are not distinct reduced models ({checked})")
    golden_name = standard[0]
    GOLDEN_CASES[family] = (golden_name, reduced(golden_name), within)

    def test_family_is_registered():
        assert len(names) >= min_models, names

    def test_mixed_precision():
        with within():
            check_mixed_precision(golden_name, **reduced(golden_name))

    def test_golden_outputs():
        check_golden_outputs(family)

    @pytest.mark.parametrize("name", standard)
    def test_standard_model_checks(name):
        # The gradient modes are the integrator's and blocks', not the layout's: every mode
        # on the family's first model, the model's own on its other layouts (CI time).
        with within():
            run_standard_model_checks(name, every_mode=name == golden_name,
                                      **(overrides(name) if overrides else {}))

    @pytest.mark.parametrize("name", [name for name in checked if name not in standard])
    def test_other_layouts_build(name):
        with within():
            keras.utils.set_random_seed(0)
            model = zoo.create_model(name, **reduced(name))
            x, _ = model_batch(model)
            probs = np.asarray(model(x, training=True))
            check_config_round_trip(model)
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)

    @pytest.mark.parametrize("name", others)
    def test_same_reduced_model(name):  # (None below when every reduced model is distinct)
        with within():
            model = zoo.create_model(name, **reduced(name))
        assert model.name == name
        steps = name not in like
        assert architecture(model, steps=steps) == checked_architecture(
            representative[name], steps), (
            f"{name} reduced is not the model {representative[name]} was checked as"
            + ("" if steps else " (up to its number of steps per stage)"))

    others_built = [name for name in checked if name not in standard]
    return (test_family_is_registered, test_standard_model_checks,
            test_same_reduced_model if others else None, test_mixed_precision,
            test_golden_outputs, test_other_layouts_build if others_built else None)
