"""Hyper-parameter search over the zoo with KerasTuner.

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

The memory-free adjoint is offered only to exactly reversible integrators: for Euler/Heun its
gradients are approximate and a tuner would silently score a wrong-gradient run (use
``kode check-gradients`` / ``kode train --gradient adjoint`` and its guard for those).

:func:`tune` holds out ``validation_fraction`` of the train split (one seeded shuffle, without
augmentation) to score trials, so the test split stays untouched until the best model is
evaluated once; it writes per-trial TensorBoard logs (KerasTuner gives every trial its own
``<directory>/tensorboard/<trial>`` plus HParams), ``best_hyperparameters.json``, the best
model as ``best.keras``, and exports it as ``kode export`` does.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

import zoo
from kode.data.datasets import DatasetInfo, load_dataset
from kode.errors import KodeError
from kode.io import write_json
from kode.training.pipeline import (
    _prepare_logdir,
    compile_classifier,
    learning_rate_schedule,
    make_optimizer,
    model_metadata,
    save_model,
)
from kode.training.settings import RECIPES

TUNERS = ("random", "bayesian", "hyperband")
#: Families with a CIFAR-style layout (lm_resnext exists only as an ImageNet bottleneck model).
TUNABLE_FAMILIES = ("resnet", "lm_resnet", "heun_resnet", "momentum_resnet", "revheun_resnet",
                    "polynet", "fractalnet", "revnet")
LM_FAMILIES = ("lm_resnet",)
REVERSIBLE_FAMILIES = ("momentum_resnet", "revheun_resnet", "revnet")
#: Families named by their convolutions with two residual functions per unit (RevNet's F and
#: G): n units per stage, CIFAR depth 6n+2 elsewhere, is RevNet depth 12n+2 = 2·(6n+2) − 2.
PAIRED_DEPTH_FAMILIES = ("revnet",)


def family_depth(family: str, depth: int) -> int:
    """The registered depth of ``family`` with the same n units per stage as CIFAR 6n+2."""
    return 2 * depth - 2 if family in PAIRED_DEPTH_FAMILIES else depth
LM_K_RANGES = {"-0.1,0": (-0.1, 0.0), "-0.5,0": (-0.5, 0.0), "0,0.5": (0.0, 0.5)}
DEFAULT_DEPTHS = (8, 14, 20)
#: Above this many training examples the held-out split is not materialized in memory.
MAX_TUNE_EXAMPLES = 100_000


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


class ZooHyperModel(kt.HyperModel):
    """The zoo as a KerasTuner search space (see the module docstring).

    Args:
        families: zoo families to search over (one fixes ``family``).
        input_shape, num_classes: of the dataset.
        steps_per_epoch, epochs: for the cosine learning-rate schedule of a trial.
        depths, width_multipliers: the choices for depth and width.
    """

    def __init__(self, families: Sequence[str], input_shape: Sequence[int], num_classes: int,
                 *, steps_per_epoch: int, epochs: int,
                 depths: Sequence[int] = DEFAULT_DEPTHS,
                 width_multipliers: Sequence[float] = (0.25, 0.5, 1.0),
                 name: str = "zoo", tunable: bool = True):
        super().__init__(name=name, tunable=tunable)
        self.families = parse_families(families)
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.steps_per_epoch, self.epochs = int(steps_per_epoch), int(epochs)
        self.depths = _check_depths(depths)
        self.width_multipliers = list(width_multipliers)

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

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        drawn = self.hyperparameters(hp)
        family, options = drawn["family"], drawn["options"]
        depth = family_depth(family, options["depth"])
        model = zoo.create_model(
            f"{family}{family_depth(family, 20)}", input_shape=self.input_shape,
            classes=self.num_classes, name=f"{family}{depth}", **{**options, "depth": depth},
        )
        schedule = learning_rate_schedule("cosine", drawn["lr"],
                                          self.epochs * self.steps_per_epoch)
        compile_classifier(model, make_optimizer(schedule, 0.9, drawn["weight_decay"]))
        return model


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


def make_tuner(kind: str, hypermodel: kt.HyperModel, *, max_trials: int, epochs: int,
               directory: str, seed: int, overwrite: bool) -> kt.Tuner:
    """A KerasTuner tuner of ``kind`` maximizing ``val_accuracy``."""
    common = {"objective": kt.Objective("val_accuracy", "max"), "directory": directory,
              "project_name": "search", "seed": seed, "overwrite": overwrite}
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        if epochs < 2:
            raise KodeError("tuner 'hyperband' needs epochs >= 2 (its most epochs per trial)")
        tuner = kt.Hyperband(hypermodel, max_epochs=epochs, factor=3, hyperband_iterations=1,
                             **common)
        # Hyperband sizes its brackets from max_epochs; the oracle still honours a cap.
        tuner.oracle.max_trials = max_trials
        return tuner
    raise KodeError(f"unknown tuner '{kind}'; choose one of {', '.join(TUNERS)}")


def tune(
    family: str | Sequence[str],
    dataset: str = "digits",
    *,
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
) -> TuneResult:
    """Search the zoo's hyper-parameters for ``family`` on ``dataset``; export the best model.

    ``max_trials`` caps the number of trials (for "hyperband" too); ``epochs`` is the number of
    epochs per trial (hyperband's ``max_epochs``). An existing search in ``directory`` is
    resumed unless ``overwrite``. The export is named ``<family><depth>-tuned`` and carries
    the same metadata as ``kode train``'s, plus the hyper-parameters.
    """
    families = parse_families(family)
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
    depths = _check_depths(DEFAULT_DEPTHS if depths is None else depths)
    if dataset not in RECIPES:
        load_dataset(dataset, data_dir=data_dir)  # the canonical unknown-dataset message
    batch_size = RECIPES[dataset].batch_size if batch_size is None else batch_size
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = directory or os.path.join("runs", f"tune-{'-'.join(families)}-{dataset}-{stamp}")
    _prepare_logdir(directory)
    if export_dir is not None:
        from kode.serving.publish import check_export_dir

        check_export_dir(export_dir, "tuned")

    keras.utils.set_random_seed(seed)
    plain_train, test_ds, info = load_dataset(dataset, batch_size=batch_size, augment=False,
                                              data_dir=data_dir, seed=seed)
    if info.train_size > MAX_TUNE_EXAMPLES:
        raise KodeError(f"{dataset} has {info.train_size} training examples; kode tune holds "
                        f"the split in memory (at most {MAX_TUNE_EXAMPLES})")
    train_ds, val_ds = _holdout(plain_train, info, validation_fraction, batch_size, seed)
    n_train = info.train_size - max(1, int(round(info.train_size * validation_fraction)))
    hypermodel = ZooHyperModel(families, info.input_shape, info.num_classes,
                               steps_per_epoch=math.ceil(n_train / batch_size), epochs=epochs,
                               depths=depths)
    search = make_tuner(tuner, hypermodel, max_trials=max_trials, epochs=epochs,
                        directory=directory, seed=seed, overwrite=overwrite)
    tensorboard_dir = os.path.join(directory, "tensorboard")
    try:
        search.search(
            train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose,
            # KerasTuner copies this per trial into tensorboard/<trial id> (+ HParams).
            callbacks=[keras.callbacks.TensorBoard(log_dir=tensorboard_dir, write_graph=False)],
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
                "val_accuracy": float(best_trial.score)}
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
                      directory, tensorboard_dir, model_path, export)
