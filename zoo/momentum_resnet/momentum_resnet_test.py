from kode.testing import family_model_tests

test_family_is_registered, test_standard_model_checks = family_model_tests("momentum_resnet")
