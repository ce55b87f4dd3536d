"""Reversible-Heun ResNet (Kidger et al. 2021): z_{n+1} = 2y_n − z_n + h f_n(z_n),
y_{n+1} = y_n + (h/2)(f_n(z_n) + f_{n+1}(z_{n+1})); exactly reversible, second order."""

from zoo.builder import family_builder, register_family

revheun_resnet = family_builder("revheun_resnet", "reversible_heun", __doc__)
register_family("revheun_resnet", revheun_resnet)
