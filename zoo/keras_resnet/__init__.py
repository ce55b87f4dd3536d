"""keras.applications ResNets ported into kode (:mod:`kode.port`): ``keras_resnet50v2`` …

Pre-activation V2: the identity blocks x + f(x) become Euler stages (h = 1); post-activation
V1: relu(x + f(x)) stages (``post_activation_euler``: checkpoint, no adjoint). ``weights``
is None, a weights file or "imagenet" (downloaded by keras.applications).
"""

from zoo.keras_resnet.applications import KERAS_RESNETS, keras_resnet
from zoo.registry import register_model

for _key, (_arch, _) in KERAS_RESNETS.items():
    register_model(f"keras_{_key}", "keras_resnet", keras_resnet, arch=_arch)
