import zoo
from kode.testing.families import family_model_tests


def _small(name):
    bottleneck = zoo.get_entry(name).defaults["bottleneck"]
    return {"depth": 20 if bottleneck else 14, "width_multiplier": 0.25}


(test_family_is_registered, test_standard_model_checks, test_same_reduced_model,
 test_mixed_precision, test_golden_outputs, test_other_layouts_build) = (
    family_model_tests("revnet", min_models=3, overrides=_small))
