"""The zoo as a KerasTuner search space, and a trial as a training run.

:class:`ZooHyperModel` is a ``kt.HyperModel`` whose search space is what distinguishes the
zoo's networks:

| hyper-parameter | values | active for |
|---|---|---|
| ``family`` | the families given (one integrator each) | always (fixed for one family) |
| ``depth`` | CIFAR depths 6n+2 (default 8, 14, 20); RevNet: 12n+2 (14, 26, 38) | always |
| ``width_multiplier`` | 0.25, 0.5, 1 | always |
| ``step_size`` | ``"1"`` (classic h = 1) or ``"ode"`` (h = 1/N) | always |
| ``final_survival_probability`` | 1 (no stochastic depth), 0.8, 0.5 | always |
| ``lm_k_init`` | k_n ~ U(−0.1, 0) (paper), U(−0.5, 0), U(0, 0.5) | LM families |
| ``gradient`` | backprop, checkpoint | non-reversible families |
| ``gradient_reversible`` | backprop, checkpoint, adjoint | revheun / momentum / revnet |
| ``lr`` | 1e-3 … 0.3, log | always |
| ``weight_decay`` | 1e-5 … 1e-3, log | always |

RevNet is named by its convolutions: the depth choice 6n+2 (n units per stage) builds the
RevNet with the same n units, depth 12n+2.

The memory-free adjoint is offered only to exactly reversible integrators
(``Integrator.reversal == "exact"``; ``lm_k_init`` to integrators with ``uses_history``: both
read from the family's integrator in the registry): for Euler/Heun its gradients are
approximate and a tuner would silently score a wrong-gradient run (use
``kode check-gradients`` / ``kode train --gradient adjoint`` and its guard for those).

Every trial is a ``kode train`` run: :class:`TrialPipeline` is
:class:`~kode.training.TrainingPipeline` with the trial's settings (the search's
:class:`~kode.training.TrainSettings` plus the drawn hyper-parameters) in KerasTuner's trial
folder ``<directory>/search/trial_<id>``, so strategy, precision, the adjoint's gradient guard,
diagnostics and end-of-epoch checkpoints work as in ``kode train``. ``kode tune`` run again
with the same arguments after a kill continues the search: KerasTuner's oracle keeps the
finished trials, and the interrupted trial resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import keras_tuner as kt
import tensorflow as tf

import zoo
from kode.data.datasets import DatasetInfo
from kode.errors import KodeError
from kode.integrators import EXACT
from kode.io import write_json
from kode.training.pipeline import TrainingPipeline
from kode.training.settings import TrainSettings
from zoo.registry import family_integrator, family_layouts

#: Integrator families with a CIFAR-style layout (lm_resnext has an ImageNet layout only).
TUNABLE_FAMILIES = tuple(f for f in zoo.list_families()
                         if family_integrator(f) is not None and "cifar" in family_layouts(f))


#: Families whose integrator carries a history (LM's k_n): they get ``lm_k_init``.
LM_FAMILIES = tuple(f for f in TUNABLE_FAMILIES if family_integrator(f).uses_history)


#: Families whose integrator reverses exactly: the only ones offered the adjoint.
REVERSIBLE_FAMILIES = tuple(f for f in TUNABLE_FAMILIES
                            if family_integrator(f).reversal == EXACT)


#: Families named by their convolutions with two residual functions per unit (RevNet's F and
#: G): n units per stage, CIFAR depth 6n+2 elsewhere, is RevNet depth 12n+2 = 2·(6n+2) − 2.
PAIRED_DEPTH_FAMILIES = ("revnet",)


def family_depth(family: str, depth: int) -> int:
    """The registered depth of ``family`` with the same n units per stage as CIFAR 6n+2."""
    return 2 * depth - 2 if family in PAIRED_DEPTH_FAMILIES else depth


LM_K_RANGES = {"-0.1,0": (-0.1, 0.0), "-0.5,0": (-0.5, 0.0), "0,0.5": (0.0, 0.5)}


DEFAULT_DEPTHS = (8, 14, 20)


def parse_families(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, one family, a comma-separated string or a list → validated family names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TUNABLE_FAMILIES)
    if not names:
        raise KodeError("no model family given; choose from " + ", ".join(TUNABLE_FAMILIES))
    for name in names:
        if name not in TUNABLE_FAMILIES:
            hint = (" (ImageNet-only layout)" if name in zoo.list_families() else "")
            raise KodeError(f"cannot tune family '{name}'{hint}; choose from "
                            f"{', '.join(TUNABLE_FAMILIES)} or 'all'")
    return list(dict.fromkeys(names))


def _check_depths(depths: Sequence[int]) -> list[int]:
    depths = list(depths)
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or d < 8
           or (d - 2) % 6]
    if not depths or bad:
        raise KodeError(f"depths must be CIFAR depths 6n+2 >= 8 (e.g. 8, 14, 20), got {depths}")
    return sorted(set(depths))


@dataclass
class TuningData:
    """The tuner's split of the train split: trials train on ``train`` and are scored on
    ``validation``; ``info.train_size`` is the size of the training part."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    info: DatasetInfo


class ZooHyperModel(kt.HyperModel):
    """The zoo as a KerasTuner search space (see the module docstring), trained by
    ``kode train``'s pipeline.

    :meth:`build` and :meth:`fit` run a :class:`TrialPipeline`: the trial's
    :class:`~kode.training.TrainSettings` are ``settings`` with the drawn hyper-parameters.

    Args:
        families: zoo families to search over (one fixes ``family``).
        input_shape, num_classes: of the dataset.
        steps_per_epoch, epochs: batches per pass over the trial's training data, and epochs
            per trial (for the learning-rate schedule).
        depths, width_multipliers: the choices for depth and width.
        settings: what every trial shares (dataset, batch, strategy, precision, guard, ...);
            default: the digits recipe with a cosine schedule.
        data: the tuner's split; :meth:`fit` needs it (:meth:`build` does not).
    """

    def __init__(self, families: Sequence[str], input_shape: Sequence[int], num_classes: int,
                 *, steps_per_epoch: int, epochs: int,
                 depths: Sequence[int] = DEFAULT_DEPTHS,
                 width_multipliers: Sequence[float] = (0.25, 0.5, 1.0),
                 settings: TrainSettings | None = None, data: TuningData | None = None,
                 name: str = "zoo", tunable: bool = True):
        super().__init__(name=name, tunable=tunable)
        self.families = parse_families(families)
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.steps_per_epoch, self.epochs = int(steps_per_epoch), int(epochs)
        self.depths = _check_depths(depths)
        self.width_multipliers = list(width_multipliers)
        self.settings = settings or TrainSettings("", epochs=self.epochs, schedule="cosine",
                                                  momentum=0.9)
        self.data = data

    def _when(self, hp: kt.HyperParameters, subset: Sequence[str]):
        """A scope in which hyper-parameters exist only for the families in ``subset``;
        None when no searched family is in it."""
        active = [f for f in self.families if f in subset]
        if not active:
            return None
        if len(self.families) == 1:
            return contextlib.nullcontext()
        return hp.conditional_scope("family", active)

    def hyperparameters(self, hp: kt.HyperParameters) -> dict:
        """Draw the hyper-parameters; returns the builder arguments and optimizer settings."""
        if len(self.families) > 1:
            family = hp.Choice("family", self.families)
        else:
            family = hp.Fixed("family", self.families[0])
        depth = hp.Choice("depth", self.depths)
        width = hp.Choice("width_multiplier", self.width_multipliers)
        step = hp.Choice("step_size", ["1", "ode"])
        survival = hp.Choice("final_survival_probability", [1.0, 0.8, 0.5])
        options = {
            "depth": depth, "width_multiplier": width,
            "step_size": "ode" if step == "ode" else 1.0,
            "final_survival_probability": None if survival >= 1.0 else survival,
        }
        scope = self._when(hp, LM_FAMILIES)
        if scope is not None:
            with scope:
                k_range = hp.Choice("lm_k_init", list(LM_K_RANGES))
            if family in LM_FAMILIES:
                options["integrator_config"] = {"k_init_range": LM_K_RANGES[k_range]}
        others = [f for f in TUNABLE_FAMILIES if f not in REVERSIBLE_FAMILIES]
        for subset, name, modes in ((others, "gradient", ["backprop", "checkpoint"]),
                                    (REVERSIBLE_FAMILIES, "gradient_reversible",
                                     ["backprop", "checkpoint", "adjoint"])):
            scope = self._when(hp, subset)
            if scope is None:
                continue
            with scope:
                mode = hp.Choice(name, modes)
            if family in subset:
                options["gradient"] = mode
        lr = hp.Float("lr", 1e-3, 0.3, sampling="log")
        weight_decay = hp.Float("weight_decay", 1e-5, 1e-3, sampling="log")
        return {"family": family, "options": options, "lr": lr, "weight_decay": weight_decay}

    def trial_settings(self, hp: kt.HyperParameters, **changes) -> TrainSettings:
        """``settings`` with the hyper-parameters drawn in ``hp`` (validated)."""
        drawn = self.hyperparameters(hp)
        family, options = drawn["family"], dict(drawn["options"])
        gradient = options.pop("gradient", "backprop")
        depth = family_depth(family, options["depth"])
        settings = dataclasses.replace(self.settings, **{
            "model": f"{family}{family_depth(family, 20)}",
            "epochs": hp.values.get("tuner/epochs", self.epochs),  # hyperband's epochs
            "lr": drawn["lr"], "weight_decay": drawn["weight_decay"], "gradient": gradient,
            "model_options": {**options, "depth": depth, "name": f"{family}{depth}"},
            **changes})
        return settings.resolve()

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        """The compiled model of a trial (the tuner calls it in the strategy's scope); sets
        the global dtype policy to the settings' precision (:func:`tune` restores it)."""
        pipeline = TrialPipeline(self.trial_settings(hp), self)
        pipeline.check_model()
        # The tuner clears the Keras session (and with it the dtype policy) before building.
        keras.mixed_precision.set_global_policy(pipeline.settings.precision)
        pipeline.load_data()
        model = pipeline.build_model(pipeline.info)
        if pipeline.settings.sync_batchnorm:
            from kode.distribute.strategy import synchronize_batchnorm

            synchronize_batchnorm(model)
        pipeline.compile(model)
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, **kwargs):
        """Train ``model`` (from :meth:`build`) with ``kode train``'s steps in the trial's
        folder, resuming an interrupted trial from its epoch checkpoint; the tuner's
        callbacks (its per-trial TensorBoard, scoring, best-epoch weights) run with the
        pipeline's. The data are :attr:`data` (``*args`` and ``validation_data`` are
        ignored)."""
        if self.data is None:
            raise KodeError("ZooHyperModel.fit needs the tuner's split (data=TuningData(...))")
        callbacks = list(kwargs.get("callbacks") or [])
        if "trial_dir" not in kwargs:
            raise KodeError("ZooHyperModel.fit runs under a tuner of make_tuner (it needs the "
                            "trial's folder)")
        changes = {"logdir": kwargs["trial_dir"]}
        for key in ("epochs", "verbose"):
            if key in kwargs:
                changes[key] = kwargs[key]
        pipeline = TrialPipeline(self.trial_settings(hp, **changes), self)
        try:
            pipeline.prepare()
            pipeline.announce_devices()
            pipeline.load_data()
            pipeline.model = model
            with pipeline.strategy.scope():
                pipeline.resume()
        except KodeError as err:  # e.g. checkpoints of other settings: stop the search
            raise SearchStopped(str(err)) from None
        if pipeline.initial_epoch and pipeline.settings.verbose:
            print(f"resuming from {pipeline.snapshots.directory}: "
                  f"{pipeline.initial_epoch} of {pipeline.settings.epochs} epochs done")
        # Hyperband continues a trial from another one's weights at its initial_epoch.
        pipeline.initial_epoch = max(pipeline.initial_epoch, kwargs.get("initial_epoch", 0))
        _restore_best_epoch(callbacks, pipeline.snapshots.history)
        pipeline.fit(pipeline.callbacks(callbacks))
        pipeline.save()
        history = keras.callbacks.History()
        history.history = pipeline.history  # restored epochs too: the tuner scores them all
        return history


class SearchStopped(KodeError, kt.errors.FatalError):
    """A trial could not start (bad settings, checkpoints of another run): KerasTuner stops
    the search instead of recording a failed trial."""


def _restore_best_epoch(callbacks: list, history: dict) -> None:
    """A resumed trial: the tuner's best-epoch weights on disk came from the restored epochs;
    only a better epoch may replace them."""
    for callback in callbacks:  # KerasTuner's SaveBestEpoch (not public API: by its fields)
        if not all(hasattr(callback, a) for a in ("objective", "best_value", "filepath")):
            continue
        if os.path.isfile(callback.filepath):
            values = history.get(callback.objective.name) or []
            for value in values:
                if callback.objective.better_than(value, callback.best_value):
                    callback.best_value = value


class TrialPipeline(TrainingPipeline):
    """One trial: :class:`~kode.training.TrainingPipeline`'s steps (settings checks, the
    strategy, optimizer and schedule, gradient guard, diagnostics, epoch checkpoints and
    resume) on the tuner's split; ``settings.logdir`` is KerasTuner's trial folder.

    Differs in three steps: :meth:`load_data` takes the tuner's split (``test_ds`` is the
    held-out validation part: fit reports ``val_accuracy`` on it); :meth:`callbacks` adds the
    tuner's callbacks (its per-trial TensorBoard with HParams replaces the pipeline's own);
    :meth:`save` writes the trial's ``metrics.json`` only (KerasTuner keeps the weights of
    the best epoch; ``kode tune`` saves and exports the best trial's model).
    """

    def __init__(self, settings: TrainSettings, hypermodel: ZooHyperModel):
        super().__init__(settings)
        self.hypermodel = hypermodel

    def load_data(self) -> None:
        hypermodel, s = self.hypermodel, self.settings
        keras.utils.set_random_seed(s.seed)
        if hypermodel.data is not None:
            data = hypermodel.data
            self.train_ds, self.test_ds, self.info = data.train, data.validation, data.info
        else:  # build only: what the model and the schedule need
            self.info = types.SimpleNamespace(input_shape=hypermodel.input_shape,
                                              num_classes=hypermodel.num_classes)
        self.batches_per_pass = hypermodel.steps_per_epoch
        self.steps_per_epoch = s.steps_per_epoch or self.batches_per_pass

    def callbacks(self, tuner_callbacks: Sequence[keras.callbacks.Callback] = ()) -> list:
        own = super().callbacks()
        checkpoint = own.pop()  # the epoch checkpoint stays last (logs complete)
        if tuner_callbacks:
            own = [c for c in own if not isinstance(c, keras.callbacks.TensorBoard)]
        return [*own, *tuner_callbacks, checkpoint]

    def save(self) -> None:
        self.model_path = None
        self.metrics_path = os.path.join(self.logdir, "metrics.json")
        write_json(self.metrics_path, {
            "validation": self.test_metrics, "config": self.config(),
            "history": {k: [float(x) for x in v] for k, v in self.history.items()},
        })
