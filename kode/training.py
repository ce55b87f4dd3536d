"""Training a zoo model on a dataset: recipes, optimizer, schedule, logs, metrics, export.

The CIFAR recipe is the paper's (Lu et al.; He et al.): SGD momentum 0.9, batch 128, weight
decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of the epochs, pad-4 crop + flip.

Weight decay is decoupled (Keras ``SGD(weight_decay=…)``: θ ← θ − lr·wd·θ each step, the same as
PyTorch's coupled decay for plain SGD). LM's k_n are *not* decayed by default: decay pulls k
towards 0, i.e. towards the plain ResNet, and a scalar per block needs no regularization. The
authors' code decays them; ``decay_lm_k=True`` does the same.

Scale-out and fault tolerance (:mod:`kode.distribute`): ``strategy`` ("default" | "mirrored" |
"multiworker" | "tpu"), ``precision`` ("float32" | "mixed_bfloat16" | "mixed_float16", loss
scaling for float16), and end-of-epoch checkpoints in ``<logdir>/checkpoints`` from which the
same call resumes automatically (model, optimizer, random-generator states and the data
pipeline's per-epoch shuffle). See docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
import tensorflow as tf

import zoo
from kode.data import DatasetInfo, load_dataset
from kode.distribute import PRECISIONS, STRATEGIES
from kode.errors import KodeError

SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """Default hyper-parameters for a dataset."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str = "step"
    momentum: float = 0.9


RECIPES = {
    "cifar10": Recipe(epochs=160, batch_size=128, lr=0.1, weight_decay=1e-4),
    "cifar100": Recipe(epochs=160, batch_size=128, lr=0.1, weight_decay=1e-4),
    "imagenet2012": Recipe(epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4),
    "mnist": Recipe(epochs=10, batch_size=128, lr=0.05, weight_decay=1e-4),
    # Small embedded data: more epochs of few steps; measured ≥ 97% test accuracy with
    # lm_resnet20 (see README).
    "digits": Recipe(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4),
}


@dataclass
class TrainResult:
    """What a run produced: the model, its history, final test metrics and the files written."""

    model: keras.Model
    history: dict
    test_metrics: dict
    logdir: str
    model_path: str
    metrics_path: str
    export: object | None = None
    config: dict = field(default_factory=dict)


def learning_rate_schedule(schedule: str, lr: float, total_steps: int):
    """lr·(1, 0.1, 0.01) switching at 50% and 75% of training ("step"), cosine, or constant."""
    if schedule == "constant":
        return lr
    if schedule == "step":
        boundaries = [max(1, int(total_steps * 0.5)), max(2, int(total_steps * 0.75))]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [lr, lr * 0.1, lr * 0.01]
        )
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, max(total_steps, 1))
    raise KodeError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")


def make_optimizer(
    lr, momentum: float, weight_decay: float, decay_lm_k: bool = False
) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.SGD(
        learning_rate=lr, momentum=momentum, weight_decay=weight_decay or None
    )
    if weight_decay and not decay_lm_k:
        optimizer.exclude_from_weight_decay(var_names=["lm_k"])
    return optimizer


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the epoch's learning rate to the logs (so TensorBoard plots it)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


def _check_positive(name: str, value, kind=int) -> None:
    if value is not None and (not isinstance(value, int | float) or value <= 0):
        raise KodeError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _prepare_logdir(logdir: str) -> None:
    try:
        os.makedirs(logdir, exist_ok=True)
        probe = os.path.join(logdir, ".kode-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise KodeError(f"log directory '{logdir}' is not writable: {err.strerror}") from None


def model_metadata(model_name: str, info: DatasetInfo, model: keras.Model) -> dict:
    """What serving and ``kode predict`` need to know besides the graph."""
    return {
        "model": model_name,
        "dataset": info.name,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "mean": list(info.mean),
        "std": list(info.std),
        "classifier_activation": "softmax",
        "keras_model_name": model.name,
    }


def train(
    model_name: str,
    dataset: str = "digits",
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    schedule: str | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    decay_lm_k: bool = False,
    seed: int = 0,
    logdir: str | None = None,
    export_dir: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    augment: bool | None = None,
    model_options: dict | None = None,
    gradient: str = "backprop",
    guard_tolerance: float = 0.05,
    guard_every: int | None = None,
    on_inaccurate: str = "stop",
    verbose: str | int = "auto",
    strategy: str | tf.distribute.Strategy = "default",
    devices: int | None = None,
    connect_timeout: float | None = None,
    tpu: str | None = None,
    precision: str = "float32",
    sync_batchnorm: bool = False,
    resume: bool = True,
    deterministic: bool = False,
    diagnostics: bool = True,
) -> TrainResult:
    """Train ``model_name`` from the zoo on ``dataset`` with the dataset's recipe, overridable.

    Writes TensorBoard logs, ``model.keras``, ``kode.json`` and ``metrics.json`` to ``logdir``;
    with ``export_dir`` also a verified SavedModel ``export_dir/<model>/<version>``.
    ``gradient`` ("backprop" | "checkpoint" | "adjoint") sets every stage's gradient mode; with
    "adjoint" the :class:`~kode.guard.GradientGuard` measures the adjoint's gradient error
    at the start (and every ``guard_every`` epochs) and, above ``guard_tolerance``, stops or
    falls back to "checkpoint" (``on_inaccurate``).

    Scale-out (:mod:`kode.distribute`): ``strategy`` is a name of
    :data:`kode.distribute.STRATEGIES` or a ready ``tf.distribute.Strategy``; a name is
    resolved before anything else touches TensorFlow (``devices`` splits the CPU into that
    many logical devices for "mirrored"; "multiworker" reads ``TF_CONFIG`` and waits at most
    ``connect_timeout`` seconds for its peers; "tpu" uses ``tpu`` or ``$TPU_NAME``).
    "multiworker" trains with a custom ``strategy.run`` loop, the others with ``fit``.
    ``batch_size`` is the global batch. ``sync_batchnorm`` computes BatchNorm statistics over
    the global batch (all replicas), which a multi-replica run needs to match one device.
    ``precision`` sets the Keras dtype policy for this run ("mixed_float16" adds dynamic loss
    scaling). ``resume``: continue from ``<logdir>/checkpoints`` if a previous run with the same
    settings was interrupted (checkpoints are written atomically after every epoch).
    ``deterministic`` turns on TensorFlow's op determinism (bitwise reproducible runs and
    resumes, somewhat slower). ``diagnostics`` writes :mod:`kode.diagnostics` summaries.
    """
    if dataset not in RECIPES:
        # load_dataset gives the canonical message for unknown names.
        load_dataset(dataset, data_dir=data_dir)
    recipe = RECIPES[dataset]
    epochs = recipe.epochs if epochs is None else epochs
    batch_size = recipe.batch_size if batch_size is None else batch_size
    lr = recipe.lr if lr is None else lr
    schedule = recipe.schedule if schedule is None else schedule
    weight_decay = recipe.weight_decay if weight_decay is None else weight_decay
    momentum = recipe.momentum if momentum is None else momentum
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    _check_positive("lr", lr, float)
    if weight_decay < 0:
        raise KodeError(f"weight_decay must be >= 0, got {weight_decay}")
    if schedule not in SCHEDULES:
        raise KodeError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    zoo.get_entry(model_name)  # unknown names fail before any data is touched
    from kode.guard import GradientGuard, check_tolerance

    check_tolerance(guard_tolerance)
    if precision not in PRECISIONS:
        raise KodeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise KodeError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = logdir or os.path.join("runs", f"{model_name}-{dataset}-{stamp}")
    _prepare_logdir(logdir)
    if export_dir is not None:
        from kode.export import check_export_dir

        check_export_dir(export_dir, model_name)

    from kode.distribute import (
        DEFAULT_CONNECT_TIMEOUT,
        CheckpointCallback,
        EpochCheckpoint,
        evaluate_distributed,
        fit_distributed,
        is_chief,
        make_strategy,
        skip_epochs,
        synchronize_batchnorm,
        worker_logdir,
    )

    # First TensorFlow work of the run: logical devices and collective ops can only be
    # configured before TensorFlow initializes its runtime.
    if isinstance(strategy, str):
        strategy_name = strategy
        strategy = make_strategy(
            strategy, devices=devices, tpu=tpu,
            connect_timeout=DEFAULT_CONNECT_TIMEOUT if connect_timeout is None
            else connect_timeout,
        )
    else:
        strategy_name = type(strategy).__name__
    multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    chief = is_chief(strategy)
    run_logdir = worker_logdir(logdir, strategy)
    if run_logdir != logdir:
        _prepare_logdir(run_logdir)
    if deterministic:
        tf.config.experimental.enable_op_determinism()

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        train_ds, test_ds, info = load_dataset(
            dataset, batch_size=batch_size, augment=augment, data_dir=data_dir,
            manual_dir=manual_dir, seed=seed,
        )
        steps_per_epoch = math.ceil(info.train_size / batch_size)
        with strategy.scope():
            model = zoo.create_model(
                model_name, input_shape=info.input_shape, classes=info.num_classes,
                **{"gradient": gradient, **(model_options or {})},
            )
            if sync_batchnorm:
                synchronize_batchnorm(model)
            optimizer = make_optimizer(
                learning_rate_schedule(schedule, lr, epochs * steps_per_epoch),
                momentum, weight_decay, decay_lm_k,
            )
            if precision == "mixed_float16":
                # float16 gradients underflow without it; Keras would also wrap it in
                # compile, done here so the custom multi-worker loop gets it too.
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                jit_compile=False,  # XLA is 2–6× slower on CPU (measured); see README
            )
            checkpoint = EpochCheckpoint(os.path.join(run_logdir, "checkpoints"), model, {
                "model": model_name, "dataset": dataset, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "schedule": schedule,
                "weight_decay": weight_decay, "momentum": momentum, "decay_lm_k": decay_lm_k,
                "seed": seed, "augment": augment, "model_options": model_options or {},
                "gradient": gradient, "precision": precision,
            })
            initial_epoch = checkpoint.restore() if resume else 0
        if initial_epoch and verbose:
            print(f"resuming from {checkpoint.directory}: {initial_epoch} of {epochs} epochs "
                  "done")

        callbacks = [
            _LearningRateLogger(),
            keras.callbacks.TensorBoard(log_dir=run_logdir, histogram_freq=0,
                                        write_graph=False),
        ]
        guard = None
        if gradient == "adjoint":
            # From a second instance of the pipeline: peeking at train_ds would draw its
            # first epoch's shuffle, and adjoint runs would see other orders than backprop's.
            x_check, y_check = next(iter(load_dataset(
                dataset, batch_size=batch_size, augment=augment, data_dir=data_dir,
                manual_dir=manual_dir, seed=seed, cache=False,
            )[0]))
            guard = GradientGuard(x_check[:32], y_check[:32], guard_tolerance, guard_every,
                                  on_inaccurate)
            callbacks.insert(0, guard)
        if diagnostics:
            from kode.diagnostics import Diagnostics

            callbacks.append(Diagnostics(run_logdir, test_ds, info.train_size))
        callbacks.append(CheckpointCallback(checkpoint))  # last: logs complete
        if multiworker:
            history = fit_distributed(
                model, train_ds, epochs=epochs, strategy=strategy, validation_data=test_ds,
                initial_epoch=initial_epoch, callbacks=callbacks,
                verbose=0 if verbose == 0 else 2,
            )
            test_metrics = {k: float(v) for k, v in
                            evaluate_distributed(model, test_ds, strategy).items()}
        else:
            # The shuffle of epoch k is drawn when an iterator of train_ds is created, and fit
            # creates iterators of a finite dataset at times that depend on initial_epoch (an
            # extra one after the first epoch). Over train_ds.repeat() with steps_per_epoch,
            # fit keeps one iterator and repetition k is epoch k; a resumed run skips the
            # repetitions already trained (see kode.distribute.skip_epochs).
            skip_epochs(train_ds, initial_epoch)
            history = model.fit(
                train_ds.repeat(), steps_per_epoch=steps_per_epoch, validation_data=test_ds,
                epochs=epochs, callbacks=callbacks, verbose=verbose,
                initial_epoch=initial_epoch,
                shuffle=False,  # the tf.data pipeline shuffles (seeded, per epoch)
            ).history
            evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
            test_metrics = {k: float(v) for k, v in evaluation.items()}
        history = checkpoint.merged_history(history)

        config = {
            "model": model_name, "dataset": dataset, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "schedule": schedule, "weight_decay": weight_decay, "momentum": momentum,
            "decay_lm_k": decay_lm_k, "seed": seed, "model_options": model_options or {},
            "gradient": gradient, "gradient_guard": guard.reports if guard else None,
            "dataset_info": asdict(info), "strategy": strategy_name,
            "replicas": int(strategy.num_replicas_in_sync), "precision": precision,
            "sync_batchnorm": sync_batchnorm, "deterministic": deterministic,
            "resumed_from_epoch": initial_epoch,
        }
        model_path = os.path.join(run_logdir, "model.keras")
        model.save(model_path)
        metadata = model_metadata(model_name, info, model)
        with open(os.path.join(run_logdir, "kode.json"), "w") as fh:
            json.dump(metadata, fh, indent=2)
        metrics_path = os.path.join(run_logdir, "metrics.json")
        with open(metrics_path, "w") as fh:
            json.dump({"test": test_metrics, "config": config,
                       "history": {k: [float(x) for x in v] for k, v in history.items()}},
                      fh, indent=2)

        export = None
        if export_dir is not None and chief:  # one export per cluster, by the chief
            from kode.export import export_model

            check_batch = next(iter(test_ds))[0][:8]
            export = export_model(
                model, export_dir, name=model_name, metadata=metadata,
                check_inputs=np.asarray(check_batch),
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainResult(model, history, test_metrics, run_logdir, model_path, metrics_path,
                       export, config)
