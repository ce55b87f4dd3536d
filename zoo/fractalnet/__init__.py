"""FractalNet (two-column join; Lu et al.'s reading, a 2nd-order Runge–Kutta step):
u_{n+1} = k1 u_n + k2 (k3 u_n + f1(u_n)) + f2(k3 u_n + f1(u_n)) with FractalNet's averaging
join k1 = k2 = 1/2, k3 = 1, f1 = h g_{2n}, f2 = (h/2) g_{2n+1}. CIFAR layouts of He et al. (as
the other families): depth 6n+2 basic / 9n+2 bottleneck counts n units per stage, widths
16/32/64; a stage's first (shape-changing) unit is the usual transition, each further unit one
join step with two residual functions, so about twice the ResNet's parameters."""

from zoo.builder import family_builder, register_family

fractalnet = family_builder("fractalnet", "fractalnet", __doc__)
register_family("fractalnet", fractalnet, imagenet=False)
