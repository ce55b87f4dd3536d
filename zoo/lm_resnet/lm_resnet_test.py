import pytest

import zoo
from kode.testing.families import family_model_tests

(test_family_is_registered, test_standard_model_checks, test_same_reduced_model,
 test_mixed_precision, test_golden_outputs, test_other_layouts_build) = (
    family_model_tests("lm_resnet", standard=["lm_resnet20", "lm_resnet56_sd"]))


def test_stochastic_depth_variants_use_paper_final_probability():
    from kode.layers.blocks import StochasticDepth

    for name, p_last in (("lm_resnet56_sd", 0.8), ("lm_resnet110_sd", 0.5)):
        model = zoo.create_model(name, input_shape=(8, 8, 3))
        probs = [layer.survival_probability for layer in model._flatten_layers()
                 if isinstance(layer, StochasticDepth)]
        depth = zoo.get_entry(name).defaults["depth"]
        blocks = (depth - 2) // 2
        expected = [1 - b / blocks * (1 - p_last) for b in range(1, blocks + 1)]
        assert sorted(probs, reverse=True) == pytest.approx(expected)
