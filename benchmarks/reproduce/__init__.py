"""``kode reproduce``: the two papers' claims as runnable experiments.

Each experiment is a module of this package with ``TITLE``, ``run(ctx) -> dict`` (JSON-able
results; figures saved with ``ctx.save_figure``) and ``report(result) -> list[str]``
(the Markdown body of its section in ``docs/results.md``). The runner
(:mod:`benchmarks.reproduce.runner`) runs each in its own process and writes the document.
"""

# Order of the sections in docs/results.md; also the order they run in.
EXPERIMENTS = (
    "smooth_weights",
    "adjoint_error",
    "memory_time",
    "depth_accuracy",
    "lm_resnet",
    "lu_schemes",
    "cifar_recipes",
    "finetune",
)
