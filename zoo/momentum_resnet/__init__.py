"""Momentum ResNet (Sander et al. 2021): v_{n+1} = γ v_n + (1−γ) h f_n(x_n),
x_{n+1} = x_n + v_{n+1}; γ = 0.9 unless ``integrator_config={"gamma": ...}``."""

from zoo.builder import family_builder, register_family

momentum_resnet = family_builder("momentum_resnet", "momentum", __doc__)
register_family("momentum_resnet", momentum_resnet)
