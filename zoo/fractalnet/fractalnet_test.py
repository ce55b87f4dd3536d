from kode.testing.families import family_model_tests

# CI time: every name is the same small model (depth 8: one fractalnet step in stage 1,
# transitions after it; quarter width). The depths differ only in their number of units, and
# the bottleneck layouts are the shared builder's, checked by the other families.
(test_family_is_registered, test_standard_model_checks, test_same_reduced_model,
 test_mixed_precision, test_golden_outputs, test_other_layouts_build) = (
    family_model_tests(
        "fractalnet", min_models=7,
        overrides=lambda name: {"depth": 8, "bottleneck": False, "width_multiplier": 0.25}))
