"""The keras.applications ResNets ported: the standard checks on one V2 (pre-activation,
Euler stages) and one V1 (post-activation stages), at keras.applications' smallest input
(32×32) and 10 classes; the deeper ones are the same model but for their number of steps per
stage. keras.applications' own builders make tiny same-shaped stand-ins here (CI time; the
full-size ResNet50V2 port is tests/tools/test_port.py's)."""

from kode.testing.applications import tiny_keras_applications
from kode.testing.families import family_model_tests

(test_family_is_registered, test_standard_model_checks, test_same_reduced_model,
 test_mixed_precision, test_golden_outputs, test_other_layouts_build) = (
    family_model_tests("keras_resnet", min_models=6, same_up_to_steps={
        "keras_resnet101v2": "keras_resnet50v2", "keras_resnet152v2": "keras_resnet50v2",
        "keras_resnet101": "keras_resnet50", "keras_resnet152": "keras_resnet50"},
        within=tiny_keras_applications, every_layout=True))
