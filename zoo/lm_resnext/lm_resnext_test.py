import zoo
from kode.testing.models import run_standard_model_checks


def test_lm_resnext50_is_grouped_and_passes_standard_checks():
    assert zoo.list_models(family="lm_resnext") == ["lm_resnext50_32x4d"]
    model = run_standard_model_checks("lm_resnext50_32x4d")
    conv = model.get_layer("stage1_transition").residual_function.conv2
    assert conv.groups == 32
