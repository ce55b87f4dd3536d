"""ResNet (He et al. 2016, pre-activation) = forward Euler: x_{n+1} = x_n + h f_n(x_n)."""

from zoo.builder import family_builder, register_family

resnet = family_builder("resnet", "euler", __doc__)
register_family("resnet", resnet)
