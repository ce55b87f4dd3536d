"""How much does one float32 rounding difference grow in training? (docs/distributed.md)

Trains ``revheun_resnet20`` depth 8 on digits for one epoch (batch 256, 6 steps, synchronized
BN irrelevant on one device, deterministic ops) three times in one process: as is, again (run
to run: must be identical), and with every initial weight multiplied by 1 ± 1e-7 (a rounding
-level perturbation). Prints the relative per-step loss differences and max |Δw| at the end,
to compare with the two-worker vs one-worker difference of tests/distribute/test_distribute.py.

    python -m benchmarks.training_sensitivity [--eps 1e-7]
"""

from __future__ import annotations

import argparse
import tempfile

import keras
import numpy as np


class _StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def run(eps: float, logdir: str) -> tuple[list[float], list[np.ndarray]]:
    import zoo
    from kode.training.pipeline import TrainingPipeline
    from kode.training.settings import TrainSettings

    steps = _StepLosses()

    def build(pipeline, info):
        model = zoo.create_model("revheun_resnet20", depth=8, input_shape=info.input_shape,
                                 classes=info.num_classes)
        if eps:
            rng = np.random.default_rng(1)
            model.set_weights([w * (1 + eps * rng.choice([-1.0, 1.0], w.shape)).astype(w.dtype)
                               for w in model.get_weights()])
        return model

    pipeline = TrainingPipeline(
        TrainSettings("revheun_resnet20", epochs=1, batch_size=256, logdir=logdir,
                      diagnostics=False, verbose=0, deterministic=True),
        build_model=build)
    callbacks = pipeline.callbacks
    pipeline.callbacks = lambda: [steps, *callbacks()]
    result = pipeline.run()
    return steps.losses, result.model.get_weights()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=1e-7, help="relative weight perturbation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        base = run(0.0, f"{root}/a")
        for name, other in (("rerun", run(0.0, f"{root}/b")),
                            (f"perturbed {args.eps:g}", run(args.eps, f"{root}/c"))):
            rel = [abs(x - y) / abs(y) for x, y in zip(other[0], base[0], strict=True)]
            worst = max(float(np.max(np.abs(a - b)))
                        for a, b in zip(other[1], base[1], strict=True))
            print(f"{name}: relative step-loss differences "
                  f"{', '.join(f'{r:.1e}' for r in rel)}; max |dw| {worst:.1e}")


if __name__ == "__main__":
    main()
