"""One training run in small steps (:class:`TrainingPipeline`) and :func:`train`, the entry
point over it.

Scale-out and fault tolerance (:mod:`kode.distribute`, :mod:`kode.training.resume`):
``strategy`` ("default" | "mirrored" | "multiworker" | "tpu"), ``precision`` ("float32" |
"mixed_bfloat16" | "mixed_float16", loss scaling for float16), and end-of-epoch snapshots in
``<logdir>/checkpoints`` from which the same call resumes automatically (model, optimizer,
random-generator states and the data pipeline's per-epoch shuffle). See docs/distributed.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import keras
import numpy as np
import tensorflow as tf

import zoo
from kode.data.datasets import DatasetInfo, check_prepared, dataset_info, dataset_label
from kode.errors import KodeError
from kode.io import finite_json, write_json, write_with
from kode.layers.stage import set_gradient_mode
from kode.scopes import op_determinism, precision_scope
from kode.training.callbacks import DivergenceStop, _LearningRateLogger
from kode.training.logdir import prepare_logdir, remove_if_empty
from kode.training.run_data import RunData, data_fingerprint, dataset_name
from kode.training.settings import (
    SCHEDULES,
    TrainResult,
    TrainSettings,
    check_model_options,
    keyword_signature,
    use_xla,
)


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


ModelBuilder = Callable[["TrainingPipeline", DatasetInfo], keras.Model]


class TrainingPipeline(RunData):
    """One training run in small steps; ``kode train``, ``kode.train``, ``kode tune`` and
    fine-tuning share them.

    :meth:`run` calls, in order: :meth:`prepare` (validate, log directory, strategy),
    :meth:`load_data`, :meth:`build_model` (inside the strategy's scope) and :meth:`compile`,
    :meth:`resume` (restore an interrupted run from its snapshots), :meth:`callbacks`,
    :meth:`fit`, :meth:`save` (``model.keras``, ``kode.json``, ``metrics.json``, all atomic) and
    :meth:`export`.

    Extension point (fine-tuning): to train another model with everything else unchanged,
    pass ``build_model`` (a callable ``(pipeline, info) -> keras.Model``) or subclass and
    override :meth:`build_model`; it runs inside the strategy's scope, gets the dataset's
    :class:`~kode.data.DatasetInfo` (input shape, classes) and ``self.settings``, and returns
    an uncompiled model (e.g. a source model with a new head, refined). ``settings.model``
    then only names the run (logdir, export name, ``kode.json``); override
    :meth:`check_model` when it is not a zoo name. :meth:`make_optimizer` is the hook for
    another optimizer or schedule. Everything a step produces is kept on the pipeline
    (``self.info``, ``self.model``, ``self.history``, …) for the following steps.
    """

    def __init__(self, settings: TrainSettings, build_model: ModelBuilder | None = None):
        self.requested = settings
        self._build_model = build_model
        self.settings: TrainSettings = settings
        self.strategy: tf.distribute.Strategy | None = None
        self.guard = None
        self.initial_epoch = 0
        self.history: dict = {}
        self.test_metrics: dict = {}

    # ------------------------------------------------------------------ steps

    def check_model(self) -> None:
        """Fail fast on an unknown model name, bad builder options or options the builder
        refuses for the dataset (its image shape, classes): nothing is built or read."""
        s = self.settings
        check_model_options(s.model, s.model_options)
        info = dataset_info(s.dataset, s.data_dir, seed=s.seed, **self.data_options())
        zoo.check_model(s.model, input_shape=info.input_shape, classes=info.num_classes,
                        **{"gradient": s.gradient, **s.model_options})

    def prepare(self) -> None:
        """Validate the settings (every refusal comes before anything is printed, written or
        configured), create the log directory, create the strategy."""
        self.settings = s = self.requested.resolve()
        check_prepared(s.dataset, s.data_dir, s.manual_dir, seed=s.seed,
                       **self.data_options())
        self.check_model()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        s.logdir = s.logdir or os.path.join(
            "runs", f"{s.model}-{dataset_label(s.dataset)}-{stamp}")
        self._created_logdir = prepare_logdir(s.logdir)
        if s.export_dir is not None:
            from kode.serving.publish import check_export_dir

            check_export_dir(s.export_dir, s.model)
        self.strategy = self.make_strategy()
        from kode.distribute.strategy import is_chief, worker_logdir

        self.chief = is_chief(self.strategy)
        self.logdir = worker_logdir(s.logdir, self.strategy)
        if self.logdir != s.logdir:
            # A worker owns only its own folder: the shared one is the chief's, even when
            # this worker happened to create it first.
            self._created_logdir = prepare_logdir(self.logdir)

    def announce_devices(self) -> None:
        """Print the devices line (verbose runs), once the settings passed every check, and
        on bfloat16 hardware training in float32 the one-line hint on mixed_bfloat16."""
        if self.settings.verbose:
            from kode.distribute.strategy import bfloat16_hint, describe_devices

            print(describe_devices(self.strategy))
            if hint := bfloat16_hint(self.settings.precision):  # once per run
                print(hint)

    def make_strategy(self) -> tf.distribute.Strategy:
        """First TensorFlow work of the run: logical devices and collective ops can only be
        configured before TensorFlow initializes its runtime."""
        s = self.settings
        if not isinstance(s.strategy, str):
            return s.strategy
        from kode.distribute.strategy import DEFAULT_CONNECT_TIMEOUT, make_strategy

        return make_strategy(
            s.strategy, devices=s.devices, tpu=s.tpu,
            connect_timeout=DEFAULT_CONNECT_TIMEOUT if s.connect_timeout is None
            else s.connect_timeout,
        )

    def load_data(self) -> None:
        s = self.settings
        keras.utils.set_random_seed(s.seed)
        self.train_ds, self.test_ds, self.info = self.load_dataset()
        skipped = (self.info.source or {}).get("skipped")
        if skipped and s.verbose:
            print(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} "
                  f"of {s.dataset} (first: {skipped[0]})")
        self.batches_per_pass = math.ceil(self.info.train_size / s.batch_size)
        self.steps_per_epoch = s.steps_per_epoch or self.batches_per_pass

    def build_model(self, info: DatasetInfo) -> keras.Model:
        """The uncompiled model (the extension point; see the class docstring)."""
        if self._build_model is not None:
            return self._build_model(self, info)
        s = self.settings
        model = zoo.create_model(s.model, input_shape=info.input_shape,
                                 classes=info.num_classes,
                                 **{"gradient": s.gradient, **s.model_options})
        if not s.recompute:
            set_gradient_mode(model, s.gradient, recompute=False)
        return model

    def make_optimizer(self) -> keras.optimizers.Optimizer:
        s = self.settings
        optimizer = make_optimizer(
            learning_rate_schedule(s.schedule, s.lr, s.epochs * self.steps_per_epoch),
            s.momentum, s.weight_decay, s.decay_lm_k,
        )
        if s.precision == "mixed_float16":
            # float16 gradients underflow without it; Keras would also wrap it in compile,
            # done here so the custom multi-worker loop gets it too.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    def compile(self, model: keras.Model) -> None:
        s = self.settings
        accelerator = bool(tf.config.list_logical_devices("GPU")
                           or tf.config.list_logical_devices("TPU"))
        compile_classifier(model, self.make_optimizer(), jit_compile=use_xla(
            s.jit_compile, s.gradient, accelerator, tf.distribute.has_strategy()))

    def resume(self) -> None:
        """Create the run's end-of-epoch snapshots and restore an interrupted run from them."""
        from kode.training.resume import EpochSnapshots

        s = self.settings
        self.snapshots = EpochSnapshots(
            os.path.join(self.logdir, "checkpoints"), self.model,
            {**s.fingerprint(), **data_fingerprint(self.info)})
        self.initial_epoch = self.snapshots.restore(s.epochs) if s.resume else 0

    def callbacks(self) -> list[keras.callbacks.Callback]:
        from kode.tools.guard import GradientGuard
        from kode.training.resume import SnapshotCallback

        s = self.settings
        callbacks = [
            DivergenceStop(),
            _LearningRateLogger(),
            keras.callbacks.TensorBoard(log_dir=self.logdir, histogram_freq=0,
                                        write_graph=False),
        ]
        if s.gradient == "adjoint":
            # From a second instance of the pipeline: peeking at train_ds would draw its
            # first epoch's shuffle, and adjoint runs would see other orders than backprop's.
            x_check, y_check = next(iter(self.load_dataset(cache=False)[0]))
            self.guard = GradientGuard(x_check[:32], y_check[:32], s.guard_tolerance,
                                       s.guard_every, s.on_inaccurate)
            callbacks.insert(0, self.guard)
        if s.diagnostics:
            from kode.tools.diagnostics import Diagnostics

            examples = round(self.info.train_size * self.steps_per_epoch / self.batches_per_pass)
            callbacks.append(Diagnostics(self.logdir, self.test_ds, examples))
        callbacks.append(SnapshotCallback(self.snapshots))  # last: logs complete
        return callbacks

    def fit(self, callbacks: list[keras.callbacks.Callback]) -> None:
        from kode.training.custom_loop import evaluate_distributed, fit_distributed

        s, model = self.settings, self.model
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            history = fit_distributed(
                model, self.train_ds, epochs=s.epochs, strategy=self.strategy,
                validation_data=self.test_ds, initial_epoch=self.initial_epoch,
                callbacks=callbacks, verbose=0 if s.verbose == 0 else 2,
                steps_per_epoch=self.steps_per_epoch,
            )
            evaluation = evaluate_distributed(model, self.test_ds, self.strategy)
        else:
            history = model.fit(
                self.train_stream(), steps_per_epoch=self.steps_per_epoch,
                validation_data=self.test_ds, epochs=s.epochs, callbacks=callbacks,
                verbose=s.verbose, initial_epoch=self.initial_epoch,
                shuffle=False,  # the tf.data pipeline shuffles (seeded, per epoch)
            ).history
            evaluation = model.evaluate(self.test_ds, verbose=0, return_dict=True)
        self.test_metrics = {k: float(v) for k, v in evaluation.items()}
        if not all(math.isfinite(v) for v in self.test_metrics.values()):
            raise KodeError(f"training diverged: test metrics are not finite "
                            f"({self.test_metrics}); no model was saved or exported")
        self.history = self.snapshots.merged_history(history)

    def train_stream(self) -> tf.data.Dataset:
        """The batches ``fit`` trains on from epoch ``initial_epoch`` on: pass after pass over
        ``train_ds`` (each pass shuffled anew), epoch k being batches [k·S, (k+1)·S) of that
        stream for S = ``steps_per_epoch``.

        The shuffle of a pass is drawn when an iterator of train_ds is created, and fit
        creates iterators of a finite dataset at times that depend on initial_epoch (an extra
        one after the first epoch). Over train_ds.repeat() with steps_per_epoch, fit keeps one
        iterator and repetition p is pass p; a resumed run creates (and drops) an iterator for
        each pass already trained through (see kode.distribute.skip_epochs), then skips the
        batches of the current pass trained before the interruption.
        """
        from kode.training.resume import skip_epochs

        passes, offset = divmod(self.initial_epoch * self.steps_per_epoch,
                                self.batches_per_pass)
        skip_epochs(self.train_ds, passes)
        stream = self.train_ds.repeat()
        return stream.skip(offset) if offset else stream

    def config(self) -> dict:
        """``metrics.json``'s ``config``: the settings and what the run found out."""
        s = self.settings
        config = s.to_dict()
        for key in ("logdir", "export_dir", "verbose"):
            config.pop(key)
        return {**config, "gradient_guard": self.guard.reports if self.guard else None,
                "dataset_info": asdict(self.info),
                "replicas": int(self.strategy.num_replicas_in_sync),
                "resumed_from_epoch": self.initial_epoch}

    def metadata(self) -> dict:
        """``kode.json``: what serving and ``kode predict`` need, and the settings."""
        return finite_json({**model_metadata(self.settings.model, self.info, self.model),
                            "training": self.config()})

    def save(self) -> None:
        """``model.keras``, ``kode.json``, ``metrics.json``: each atomic and durable."""
        self.model_path = os.path.join(self.logdir, "model.keras")
        self.metrics_path = os.path.join(self.logdir, "metrics.json")
        save_model(self.model, self.model_path)
        write_json(os.path.join(self.logdir, "kode.json"), self.metadata())
        write_json(self.metrics_path, {
            "test": self.test_metrics, "config": self.config(),
            "history": {k: [float(x) for x in v] for k, v in self.history.items()},
        })

    def export(self):
        """The verified SavedModel (by the chief only: one export per cluster)."""
        s = self.settings
        if s.export_dir is None or not self.chief:
            return None
        from kode.serving.export import export_model

        check_batch = next(iter(self.test_ds))[0][:8]
        return export_model(self.model, s.export_dir, name=s.model, metadata=self.metadata(),
                            check_inputs=np.asarray(check_batch))

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        self._created_logdir = None
        try:
            self.prepare()
            s = self.settings
            with precision_scope(s.precision), op_determinism(s.deterministic):
                self.load_data()
                with self.strategy.scope():
                    self.model = self.build_model(self.info)
                    if s.sync_batchnorm:
                        from kode.distribute.strategy import synchronize_batchnorm

                        synchronize_batchnorm(self.model)
                    self.compile(self.model)
                    self.resume()
                self.announce_devices()  # after the model is built: a refusal is the only line
                if self.initial_epoch and s.verbose:
                    print(f"resuming from {self.snapshots.directory}: "
                          f"{self.initial_epoch} of {s.epochs} epochs done")
                self.fit(self.callbacks())
                self.save()
                export = self.export()
        except BaseException:
            remove_if_empty(self._created_logdir)  # a failed run leaves no empty folder
            raise
        return TrainResult(self.model, self.history, self.test_metrics, self.logdir,
                           self.model_path, self.metrics_path, export, self.config())


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                       jit_compile: bool = False) -> None:
    """Compile for sparse-label classification with probability outputs (train and tune);
    ``jit_compile``: the train step compiled by XLA (:func:`use_xla` decides it)."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def save_model(model: keras.Model, path: str) -> None:
    """``model.save(path)``, atomically: a temporary ``.keras`` beside it, fsync, rename."""
    write_with(path, model.save, suffix=".keras")


def train(model_name: str, dataset: str | tuple = "digits", *, validation: tuple | None = None,
          **settings) -> TrainResult:
    """Train ``model_name`` from the zoo on ``dataset`` with the dataset's recipe, overridable
    by the keywords of :class:`TrainSettings`.

    Writes TensorBoard logs, ``model.keras``, ``kode.json`` and ``metrics.json`` to ``logdir``;
    with ``export_dir`` also a verified SavedModel ``export_dir/<model>/<version>``.
    ``gradient`` ("backprop" | "checkpoint" | "adjoint") sets every stage's gradient mode; with
    "adjoint" the :class:`~kode.tools.guard.GradientGuard` measures the adjoint's gradient error
    at the start (and every ``guard_every`` epochs) and, above ``guard_tolerance``, stops or
    falls back to "checkpoint" (``on_inaccurate``).

    Scale-out (:mod:`kode.distribute`): ``strategy`` is a name of
    :data:`kode.distribute.STRATEGIES` or a ready ``tf.distribute.Strategy``; a name is
    resolved before anything else touches TensorFlow (``devices`` splits the CPU into that
    many logical devices for "mirrored"; "multiworker" reads ``TF_CONFIG`` and waits at most
    ``connect_timeout`` seconds for its peers; "tpu" uses ``tpu`` or ``$TPU_NAME``).
    "multiworker" trains with a custom ``strategy.run`` loop, the others with ``fit``.
    ``batch_size`` is the global batch. ``steps_per_epoch`` (as Keras' ``fit``; default one pass
    over the training set): epoch k trains on batches k·N … k·N + N − 1 of the endless sequence
    of reshuffled passes, and the learning-rate schedule spans epochs·N steps.
    ``sync_batchnorm`` computes BatchNorm statistics over the global batch (all replicas),
    which a multi-replica run needs to match one device.
    ``precision`` sets the Keras dtype policy for this run ("mixed_float16" adds dynamic loss
    scaling). ``resume``: continue from ``<logdir>/checkpoints`` if a previous run with the same
    settings was interrupted (checkpoints are written atomically after every epoch).
    ``deterministic`` turns on TensorFlow's op determinism (bitwise reproducible runs and
    resumes, somewhat slower). ``diagnostics`` writes :mod:`kode.diagnostics` summaries.

    ``dataset``: a built-in name, a folder of images (one sub-folder per class; ``image_size``,
    ``validation_split``, ``skip_bad_images``), ``"tfds:NAME"``, or an ``(images, labels)``
    pair of numpy arrays with pixel values 0–255 (``validation=(images, labels)`` for its test
    split; see :mod:`kode.data.arrays`).

    Bad values (unknown names, non-finite or non-positive numbers) raise :class:`KodeError`
    before anything is written; a run whose loss becomes NaN/inf stops with "training
    diverged" and saves nothing.
    """
    return TrainingPipeline(TrainSettings(model_name, dataset_name(dataset, validation),
                                          **settings)).run()


train.__signature__ = keyword_signature(TrainSettings, "model_name", skip=("model", "dataset"))
