"""Hyper-parameter search over the zoo with KerasTuner (the search space and the trial's
pipeline: :mod:`kode.training.search_space`).

:func:`tune` holds out ``validation_fraction`` of the train split (one seeded shuffle, without
augmentation) to score trials, so the test split stays untouched until the best model is
evaluated once; it writes per-trial TensorBoard logs (KerasTuner gives every trial its own
``<directory>/tensorboard/<trial>`` plus HParams; diagnostics go to the trial folder),
``best_hyperparameters.json``, the best model as ``best.keras``, and exports it as
``kode export`` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from kode.data.datasets import DatasetInfo, dataset_label
from kode.errors import KodeError
from kode.io import write_json
from kode.scopes import op_determinism, precision_scope
from kode.training.logdir import remove_if_empty
from kode.training.pipeline import TrainingPipeline, model_metadata, save_model
from kode.training.run_data import dataset_name
from kode.training.search_space import (
    DEFAULT_DEPTHS,
    TuningData,
    ZooHyperModel,
    _check_depths,
    family_depth,
    parse_families,
)
from kode.training.settings import TrainSettings

TUNERS = ("random", "bayesian", "hyperband")


#: Above this many training examples the held-out split is not materialized in memory.
MAX_TUNE_EXAMPLES = 100_000


@dataclass
class TuneResult:
    """What a search produced."""

    best_hyperparameters: dict
    best_trial_id: str
    best_score: float
    test_metrics: dict
    model: keras.Model
    directory: str
    tensorboard_dir: str
    model_path: str
    export: object | None = None


def _holdout(train_ds: tf.data.Dataset, info: DatasetInfo, fraction: float, batch_size: int,
             seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Split one seeded pass over the (unaugmented) train pipeline into train/validation."""
    xs, ys = [], []
    for x, y in train_ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    n_val = max(1, int(round(len(x) * fraction)))
    if n_val >= len(x):
        raise KodeError(f"validation fraction {fraction} leaves no training examples")
    train = (tf.data.Dataset.from_tensor_slices((x[n_val:], y[n_val:]))
             .shuffle(len(x) - n_val, seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    val = tf.data.Dataset.from_tensor_slices((x[:n_val], y[:n_val])).batch(batch_size)
    return train, val


class _TrialFolder:
    """Tuner mixin: hands the trial's folder to :meth:`ZooHyperModel.fit` (``trial_dir``)."""

    def run_trial(self, trial, *args, **kwargs):
        return super().run_trial(trial, *args, trial_dir=self.get_trial_dir(trial.trial_id),
                                 **kwargs)


_TUNER_CLASSES = {kind: type(cls.__name__, (_TrialFolder, cls), {}) for kind, cls in (
    ("random", kt.RandomSearch), ("bayesian", kt.BayesianOptimization),
    ("hyperband", kt.Hyperband))}


def make_tuner(kind: str, hypermodel: kt.HyperModel, *, max_trials: int, epochs: int,
               directory: str, seed: int, overwrite: bool,
               distribution_strategy: tf.distribute.Strategy | None = None) -> kt.Tuner:
    """A KerasTuner tuner of ``kind`` maximizing ``val_accuracy`` (models are built in
    ``distribution_strategy``'s scope)."""
    common = {"objective": kt.Objective("val_accuracy", "max"), "directory": directory,
              "project_name": "search", "seed": seed, "overwrite": overwrite,
              "distribution_strategy": distribution_strategy}
    if kind == "random":
        return _TUNER_CLASSES[kind](hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return _TUNER_CLASSES[kind](hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        if epochs < 2:
            raise KodeError("tuner 'hyperband' needs epochs >= 2 (its most epochs per trial)")
        tuner = _TUNER_CLASSES[kind](hypermodel, max_epochs=epochs, factor=3,
                                     hyperband_iterations=1, **common)
        # Hyperband sizes its brackets from max_epochs; the oracle still honours a cap.
        tuner.oracle.max_trials = max_trials
        return tuner
    raise KodeError(f"unknown tuner '{kind}'; choose one of {', '.join(TUNERS)}")


def _resume_line(search: kt.Tuner, directory: str, max_trials: int) -> str | None:
    """One line for a search reloaded from ``directory``, None for a new one."""
    trials = list(search.oracle.trials.values())
    if not trials:
        return None
    done = sum(t.status == kt.engine.trial.TrialStatus.COMPLETED for t in trials)
    line = f"resuming the search in {directory}: {done} of {max_trials} trials done"
    for trial in trials:
        if trial.status != kt.engine.trial.TrialStatus.RUNNING:
            continue
        progress = os.path.join(search.get_trial_dir(trial.trial_id), "checkpoints",
                                "progress.json")
        try:
            with open(progress) as fh:
                epochs = json.load(fh)["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            epochs = 0
        line += (f"; interrupted trial {trial.trial_id} continues from its checkpoint "
                 f"({epochs} epochs done)" if epochs else
                 f"; interrupted trial {trial.trial_id} starts again (no epoch completed)")
    return line


def tune(
    family: str | Sequence[str],
    dataset: str | tuple = "digits",
    *,
    validation: tuple | None = None,
    tuner: str = "random",
    max_trials: int = 10,
    epochs: int = 10,
    batch_size: int | None = None,
    depths: Sequence[int] | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    directory: str | None = None,
    export_dir: str | None = "saved_models",
    data_dir: str | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
    strategy: str | tf.distribute.Strategy = "default",
    devices: int | None = None,
    connect_timeout: float | None = None,
    tpu: str | None = None,
    precision: str = "float32",
    sync_batchnorm: bool = False,
    deterministic: bool = False,
    diagnostics: bool = True,
    guard_tolerance: float = 0.05,
    guard_every: int | None = None,
    on_inaccurate: str = "stop",
    recompute: bool = True,
    jit_compile: str | bool = "auto",
    image_size: int | None = None,
    validation_split: float = 0.2,
    skip_bad_images: bool = False,
) -> TuneResult:
    """Search the zoo's hyper-parameters for ``family`` on ``dataset``; export the best model.

    ``max_trials`` caps the number of trials (for "hyperband" too); ``epochs`` is the number of
    epochs per trial (hyperband's ``max_epochs``). Every trial is a ``kode train`` run
    (:class:`TrialPipeline`) in KerasTuner's trial folder ``<directory>/search/trial_<id>``:
    ``strategy``/``devices``/``connect_timeout``/``tpu``, ``precision``, ``sync_batchnorm``,
    ``deterministic``, ``diagnostics`` and the adjoint's guard (``guard_tolerance``,
    ``guard_every``, ``on_inaccurate``), ``recompute``, ``jit_compile`` and, for a folder of
    images or tfds:NAME, ``image_size``, ``validation_split`` (the test split of a folder without
    test/; ``validation_fraction`` is then held out of the rest) and ``skip_bad_images`` mean
    what they mean for :func:`kode.train`; ``dataset`` and ``validation`` too (a name, a folder,
    tfds:NAME or an (images, labels) pair of arrays)
    ("multiworker" is refused: KerasTuner's search runs in one process).

    An existing search in ``directory`` is resumed unless ``overwrite``: finished trials are
    kept, an interrupted trial continues from its last epoch checkpoint. The export is named
    ``<family><depth>-tuned`` and carries the same metadata as ``kode train``'s, plus the
    hyper-parameters. Bad values raise :class:`KodeError` before anything is written.
    """
    families = parse_families(family)
    dataset = dataset_name(dataset, validation)  # arrays: registered under their hash
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise KodeError(f"max_trials must be a positive integer, got {max_trials!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise KodeError(f"epochs must be a positive integer, got {epochs!r}")
    if tuner not in TUNERS:
        raise KodeError(f"unknown tuner '{tuner}'; choose one of {', '.join(TUNERS)}")
    if tuner == "hyperband" and epochs < 2:
        raise KodeError("tuner 'hyperband' needs epochs >= 2 (its most epochs per trial)")
    if not 0 < validation_fraction < 1:
        raise KodeError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if strategy == "multiworker":
        raise KodeError("kode tune runs its search in one process: strategy 'multiworker' is "
                        "for kode train (use mirrored, tpu or default)")
    depths = _check_depths(DEFAULT_DEPTHS if depths is None else depths)
    first = families[0]
    settings = TrainSettings(
        f"{first}{family_depth(first, 20)}", dataset, epochs=epochs, batch_size=batch_size,
        schedule="cosine", momentum=0.9, seed=seed, data_dir=data_dir, verbose=verbose,
        strategy=strategy, devices=devices, connect_timeout=connect_timeout, tpu=tpu,
        precision=precision, sync_batchnorm=sync_batchnorm, deterministic=deterministic,
        diagnostics=diagnostics, guard_tolerance=guard_tolerance, guard_every=guard_every,
        on_inaccurate=on_inaccurate, recompute=recompute, jit_compile=jit_compile,
        image_size=image_size, validation_split=validation_split,
        skip_bad_images=skip_bad_images,
    ).resolve()  # every bad value fails here, before anything is written
    if export_dir is not None:
        from kode.serving.publish import check_export_dir

        check_export_dir(export_dir, "tuned")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = directory or os.path.join(
        "runs", f"tune-{'-'.join(families)}-{dataset_label(settings.dataset)}-{stamp}")
    # The search's own pipeline: the log directory and the strategy (before TensorFlow runs).
    search_pipeline = TrainingPipeline(dataclasses.replace(settings, logdir=directory))
    search_pipeline._created_logdir = None
    try:
        with precision_scope(settings.precision), op_determinism(settings.deterministic):
            search_pipeline.prepare()
            search_pipeline.announce_devices()
            # The search pipeline's settings: a folder's image size is filled in.
            settings = dataclasses.replace(search_pipeline.settings, logdir=None)
            return _search(families, settings, search_pipeline.strategy, directory,
                           tuner=tuner, max_trials=max_trials, depths=depths,
                           validation_fraction=validation_fraction, export_dir=export_dir,
                           overwrite=overwrite)
    except BaseException:
        remove_if_empty(search_pipeline._created_logdir)  # a failed search leaves no folder
        raise


def _search(families: list[str], settings: TrainSettings, strategy: tf.distribute.Strategy,
            directory: str, *, tuner: str, max_trials: int, depths: list[int],
            validation_fraction: float, export_dir: str | None, overwrite: bool) -> TuneResult:
    """:func:`tune` after its checks, in the strategy and precision of the trials."""
    seed, batch_size, epochs = settings.seed, settings.batch_size, settings.epochs
    keras.utils.set_random_seed(seed)
    plain_train, test_ds, info = TrainingPipeline(dataclasses.replace(
        settings, augment=False)).load_dataset()
    if info.train_size > MAX_TUNE_EXAMPLES:
        raise KodeError(f"{settings.dataset} has {info.train_size} training examples; kode tune "
                        f"holds the split in memory (at most {MAX_TUNE_EXAMPLES})")
    train_ds, val_ds = _holdout(plain_train, info, validation_fraction, batch_size, seed)
    n_train = info.train_size - max(1, int(round(info.train_size * validation_fraction)))
    data = TuningData(train_ds, val_ds, dataclasses.replace(info, train_size=n_train))
    hypermodel = ZooHyperModel(
        families, info.input_shape, info.num_classes,
        steps_per_epoch=math.ceil(n_train / batch_size), epochs=epochs, depths=depths,
        settings=dataclasses.replace(settings, strategy=strategy), data=data)
    search = make_tuner(tuner, hypermodel, max_trials=max_trials, epochs=epochs,
                        directory=directory, seed=seed, overwrite=overwrite,
                        distribution_strategy=strategy)
    resumed = _resume_line(search, directory, max_trials)
    if resumed and settings.verbose:
        print(resumed)
    try:
        search.search(
            epochs=epochs, verbose=settings.verbose,
            # KerasTuner copies this per trial into tensorboard/<trial id> (+ HParams).
            callbacks=[keras.callbacks.TensorBoard(log_dir=os.path.join(directory, "tensorboard"),
                                                   write_graph=False)],
        )
    except RuntimeError as err:  # "Too many failed attempts to build model" and the like
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KodeError(f"tuning failed: {first}") from None
    best_trials = search.oracle.get_best_trials(1)
    if not best_trials or best_trials[0].score is None:
        raise KodeError(f"no completed trial in {directory}; see the tuner's log above")
    best_trial = best_trials[0]
    best_hp = best_trial.hyperparameters
    model = search.get_best_models(1)[0]
    evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
    test_metrics = {k: float(v) for k, v in evaluation.items()}

    values = dict(best_hp.values)
    model_path = os.path.join(directory, "best.keras")
    save_model(model, model_path)
    name = f"{values['family']}{family_depth(values['family'], values['depth'])}-tuned"
    metadata = {**model_metadata(name, info, model), "hyperparameters": values,
                "tuner": tuner, "trial_id": best_trial.trial_id,
                "val_accuracy": float(best_trial.score),
                "training": {"strategy": settings.strategy_name,
                             "replicas": int(strategy.num_replicas_in_sync),
                             "precision": settings.precision}}
    write_json(os.path.join(directory, "kode.json"), metadata)
    write_json(os.path.join(directory, "best_hyperparameters.json"),
               {"hyperparameters": values, "trial_id": best_trial.trial_id,
                "val_accuracy": float(best_trial.score), "test": test_metrics})
    export = None
    if export_dir is not None:
        from kode.serving.export import export_model

        export = export_model(model, export_dir, name=name, metadata=metadata,
                              check_inputs=np.asarray(next(iter(test_ds))[0][:8]))
    return TuneResult(values, best_trial.trial_id, float(best_trial.score), test_metrics, model,
                      # tensorboard/<trial> (HParams) and search/trial_<id>/diagnostics
                      directory, directory, model_path, export)
