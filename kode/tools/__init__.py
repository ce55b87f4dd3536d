"""Model tools over kode's layers (they know no zoo name and no training run):

- :mod:`kode.tools.stages`: a model's integrator stages and the inputs they receive;
- :mod:`kode.tools.port`: a functional Keras model's residual blocks as integrator stages;
- :mod:`kode.tools.refine`: each Euler step split into m steps of h/m;
- :mod:`kode.tools.guard`: the adjoint's gradient error measured against backprop;
- :mod:`kode.tools.diagnostics`: TensorBoard diagnostics of the ODE view.
"""
