"""kode's model zoo: ``create_model(name, **overrides)`` and ``list_models(pattern)``.

Importing the package registers every family (one folder each).
"""

from kode.tools.port import port_model
from zoo import (  # noqa: F401  (importing a family registers it)
    fractalnet,
    heun_resnet,
    keras_resnet,
    lm_resnet,
    lm_resnext,
    momentum_resnet,
    polynet,
    resnet,
    revheun_resnet,
    revnet,
)
from zoo.registry import (
    check_model,
    create_model,
    get_entry,
    list_families,
    list_models,
    register_model,
)

__all__ = ["check_model", "create_model", "get_entry", "list_families", "list_models", "port_model",
           "register_model"]
