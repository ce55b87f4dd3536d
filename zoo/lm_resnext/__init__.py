"""LM-ResNeXt (Lu et al. 2018): the LM two-step scheme on ResNeXt bottlenecks (grouped 3×3,
cardinality 32, 4 channels per group in the first stage): u_{n+1} = (1−k_n) u_n + k_n u_{n−1}
+ h f_n(u_n)."""

from zoo.builder import family_builder
from zoo.registry import register_model

lm_resnext = family_builder("lm_resnext", "lm", __doc__)
register_model("lm_resnext50_32x4d", "lm_resnext", lm_resnext, depth=50, layout="imagenet",
               bottleneck=True, classes=1000, groups=32, group_width=4)
