"""Training runs: settings (:mod:`~kode.training.settings`), the one pipeline every entry point
runs (:mod:`~kode.training.pipeline`), its callbacks, resuming (:mod:`~kode.training.resume`),
the custom loop for multi-worker strategies, fine-tuning and hyper-parameter tuning."""

from kode.training.pipeline import TrainingPipeline, train
from kode.training.settings import TrainResult, TrainSettings

__all__ = ["TrainResult", "TrainSettings", "TrainingPipeline", "train"]
