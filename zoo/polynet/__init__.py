"""PolyNet (poly-2 modules; Lu et al.'s reading, an approximation of backward Euler):
u_{n+1} = u_n + F_n(u_n) + F_n(F_n(u_n)), F_n = h f_n. CIFAR layouts of He et al. (as the
other families): depth 6n+2 basic / 9n+2 bottleneck, widths 16/32/64; each block is one poly-2
module whose f_n is applied twice, so the parameters are those of the ResNet of that depth."""

from zoo.builder import family_builder, register_family

polynet = family_builder("polynet", "polynet", __doc__)
register_family("polynet", polynet, imagenet=False)
