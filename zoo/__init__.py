"""kode's model zoo: ``create_model(name, **overrides)`` and ``list_models(pattern)``.

Importing the package registers every family (one folder each).
"""

from kode.port import port_model
from zoo import (  # noqa: F401  (importing a family registers it)
    heun_resnet,
    keras_resnet,
    lm_resnet,
    lm_resnext,
    momentum_resnet,
    resnet,
    revheun_resnet,
)
from zoo.registry import create_model, get_entry, list_families, list_models, register_model

__all__ = ["create_model", "get_entry", "list_families", "list_models", "port_model",
           "register_model"]
