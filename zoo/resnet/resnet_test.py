from kode.testing.families import family_model_tests

(test_family_is_registered, test_standard_model_checks, test_same_reduced_model,
 test_mixed_precision, test_golden_outputs, test_other_layouts_build) = (
    family_model_tests("resnet", every_layout=True))
