"""LM-ResNet (Lu et al. 2018): u_{n+1} = (1−k_n) u_n + k_n u_{n−1} + h f_n(u_n),
one trainable k_n per step (paper convention, init U(−0.1, 0)); the network's first block and
the transition blocks are plain residual steps without k. ``_sd`` variants add stochastic depth
with the paper's final survival probability p_L (0.8 for depth 56, 0.5 for 110).
"""

from zoo.builder import family_builder, register_family
from zoo.registry import register_model

lm_resnet = family_builder("lm_resnet", "lm", __doc__)

register_family("lm_resnet", lm_resnet)
for _depth, _p_last in ((56, 0.8), (110, 0.5)):
    register_model(f"lm_resnet{_depth}_sd", "lm_resnet", lm_resnet, depth=_depth, layout="cifar",
                   classes=10, final_survival_probability=_p_last)
