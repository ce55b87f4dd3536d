import pytest

import zoo
from kode.testing import run_standard_model_checks

NAMES = zoo.list_models(family="resnet")


def test_family_is_registered():
    assert len(NAMES) >= 12


@pytest.mark.parametrize("name", NAMES)
def test_standard_model_checks(name):
    run_standard_model_checks(name)
