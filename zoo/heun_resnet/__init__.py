"""Heun-ResNet (Sander et al. 2022): x_{n+1} = x_n + (k1 + k2)/2, k1 = h f_n(x_n),
k2 = h f_{n+1}(x_n + k1); N residual functions per stage on the time grid, N−1 steps."""

from zoo.builder import family_builder, register_family

heun_resnet = family_builder("heun_resnet", "heun", __doc__)
register_family("heun_resnet", heun_resnet)
