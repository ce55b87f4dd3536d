from kode.testing.models import family_model_tests

test_family_is_registered, test_standard_model_checks, test_same_reduced_model = (
    family_model_tests("resnet"))
