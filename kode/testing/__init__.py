"""Shared test helpers (after keras-hub's): every zoo model passes :mod:`kode.testing.models`'
standard checks, every kode layer :mod:`kode.testing.layers`' contract checks."""

from kode.testing.families import family_model_tests
from kode.testing.layers import (
    DTYPE_POLICIES,
    LAYER_CASES,
    LayerCase,
    check_checkpoint_round_trip,
    check_layer_checkpoint,
    check_layer_dtypes,
    check_layer_test,
    check_layers_have_cases,
    checkpointed_variables,
    layer_contract_tests,
    load_layer_cases,
    register_layer_case,
    run_layer_contract_checks,
)
from kode.testing.models import (
    REDUCED_CIFAR_INPUT,
    REDUCED_IMAGENET_INPUT,
    architecture,
    check_fit_step,
    check_keras_round_trip,
    check_savedmodel_round_trip,
    image_serving_contract,
    reduced_overrides,
    run_standard_model_checks,
    serving_contract,
)

__all__ = [
    "DTYPE_POLICIES", "LAYER_CASES", "REDUCED_CIFAR_INPUT", "REDUCED_IMAGENET_INPUT",
    "LayerCase", "architecture", "check_checkpoint_round_trip", "check_fit_step",
    "check_keras_round_trip", "check_layer_checkpoint", "check_layer_dtypes",
    "check_layer_test", "check_layers_have_cases", "check_savedmodel_round_trip",
    "checkpointed_variables", "family_model_tests", "image_serving_contract",
    "layer_contract_tests", "load_layer_cases",
    "reduced_overrides", "register_layer_case", "run_layer_contract_checks",
    "run_standard_model_checks", "serving_contract",
]
