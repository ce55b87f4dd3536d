"""The settings of a training run (:class:`TrainSettings`, what ``kode train`` fills and
``kode.json`` records), the recipes and their validation.

The CIFAR recipe is the paper's (Lu et al.; He et al.): SGD momentum 0.9, batch 128, weight
decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of the epochs, pad-4 crop + flip.

Weight decay is decoupled (Keras ``SGD(weight_decay=…)``: θ ← θ − lr·wd·θ each step, the same as
PyTorch's coupled decay for plain SGD). LM's k_n are *not* decayed by default: decay pulls k
towards 0, i.e. towards the plain ResNet, and a scalar per block needs no regularization. The
authors' code decays them; ``decay_lm_k=True`` does the same.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import keras

import zoo
from kode.data.datasets import dataset_kind
from kode.distribute.strategy import PRECISIONS, STRATEGIES
from kode.errors import KodeError, check_argument_types

SCHEDULES = ("step", "cosine", "constant")


#: the --jit-compile choices: XLA where Keras' jit_compile="auto" would pick it, always, never.
JIT_COMPILE = ("auto", "on", "off")


def use_xla(jit_compile: str | bool, gradient: str, accelerator: bool,
            distributed: bool) -> bool:
    """Whether the train step compiles with XLA. "on"/True and "off"/False as asked; "auto"
    follows Keras' ``jit_compile="auto"`` (XLA on a GPU or TPU, not on a CPU-only machine, where
    it is slower, nor under a tf.distribute strategy), except in the "checkpoint" and
    "adjoint" gradient modes, whose memory under XLA is measured on XLA's CPU compiler only
    (and the exact reversals' adjoint grows there): "auto" keeps them off XLA."""
    if isinstance(jit_compile, bool):
        return jit_compile
    if jit_compile != "auto":
        return jit_compile == "on"
    return accelerator and not distributed and gradient == "backprop"


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

#: The recipe of a folder of images or a tfds:NAME dataset (the digits recipe, smaller batches).
OWN_DATA_RECIPE = Recipe(epochs=30, batch_size=32, lr=0.05, weight_decay=5e-4)


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


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(name: str, value, kind=int) -> None:
    """``value`` is a positive ``kind`` (int: a whole number; float: finite, not NaN/inf)."""
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
    else:
        ok = _is_number(value) and math.isfinite(value) and value > 0
    if value is not None and not ok:
        what = "integer" if kind is int else "finite number"
        raise KodeError(f"{name} must be a positive {what}, got {value!r}")


def _check_non_negative(name: str, value) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise KodeError(f"{name} must be a finite number >= 0, got {value!r}")


#: Builder arguments the pipeline sets from the dataset; an option may not override them.
_PIPELINE_ARGUMENTS = {"input_shape": "the dataset's image shape",
                       "classes": "the dataset's number of classes",
                       "include_top": "the classifier it trains (include_top true)",
                       "pooling": "the classifier it trains (include_top true, no pooling)",
                       "classifier_activation": "the loss it trains with (softmax)"}


def check_model_options(model_name: str, options: dict) -> dict:
    """Refuse options the builder of ``model_name`` does not take, options the pipeline sets
    itself, and non-numbers / non-finite numbers where the builder expects a number."""
    from kode.layers.stage import resolve_step_size

    if not isinstance(options, dict):
        raise KodeError(f"model_options must be a dict of builder arguments, got {options!r}")
    entry = zoo.get_entry(model_name)
    parameters = inspect.signature(entry.builder).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key, value in options.items():
        if key in _PIPELINE_ARGUMENTS:
            raise KodeError(f"option {key} is set by the training pipeline from "
                            f"{_PIPELINE_ARGUMENTS[key]}; remove --option {key}")
        if key not in parameters:
            if open_ended:
                continue
            known = ", ".join(sorted(p for p in parameters if p not in _PIPELINE_ARGUMENTS))
            raise KodeError(f"unknown option '{key}' for {model_name}; options: {known}")
        default = parameters[key].default if key in parameters else None
        if _is_number(default) and value is not None and key not in ("step_size", "horizon"):
            if not _is_number(value) or not math.isfinite(value):
                raise KodeError(f"option {key} takes a finite number, got {value!r}")
    if "step_size" in options or "horizon" in options:
        resolve_step_size(options.get("step_size", 1.0), 1, options.get("horizon", 1.0))
    return options


#: The numeric settings :meth:`TrainSettings.resolve` checks itself.
_NUMBERS = ("epochs", "batch_size", "steps_per_epoch", "lr", "weight_decay", "momentum",
            "guard_every", "devices", "connect_timeout", "image_size", "validation_split")


@dataclass
class TrainSettings:
    """Everything that defines a training run: what ``kode train`` fills from its options,
    what ``kode.train(...)`` takes as keywords, and what ``metrics.json`` (``config``) and
    ``kode.json`` (``training``) record. ``None`` means "the dataset's recipe"
    (:data:`RECIPES`); :meth:`resolve` fills those in and validates everything.
    """

    model: str
    dataset: str = "digits"
    epochs: int | None = None
    batch_size: int | None = None  #: the global batch (all replicas)
    #: optimizer steps per epoch, as ``model.fit(steps_per_epoch=...)``: epochs then cut the
    #: endless stream of shuffled passes into pieces of this many batches (None: one pass).
    steps_per_epoch: int | None = None
    lr: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    decay_lm_k: bool = False
    seed: int = 0
    logdir: str | None = None
    export_dir: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    augment: bool | None = None
    model_options: dict | None = None  #: builder arguments (depth, step_size, ...)
    gradient: str = "backprop"
    #: in "checkpoint"/"adjoint", recompute the layers outside the stages in the backward too
    recompute: bool = True
    guard_tolerance: float = 0.05
    guard_every: int | None = None
    on_inaccurate: str = "stop"
    verbose: str | int = "auto"
    strategy: Any = "default"  #: a name of STRATEGIES or a tf.distribute.Strategy
    devices: int | None = None
    connect_timeout: float | None = None
    tpu: str | None = None
    precision: str = "float32"
    sync_batchnorm: bool = False
    resume: bool = True
    deterministic: bool = False
    diagnostics: bool = True
    #: XLA for the train step: "auto" (Keras' rule, see use_xla), "on"/True, "off"/False
    jit_compile: str | bool = "auto"
    #: folders and tfds:NAME: side of the images (folders: default the model's layout's)
    image_size: int | None = None
    #: folders without test/: fraction of each class held out as the test split (seeded)
    validation_split: float = 0.2
    #: folders: leave out unreadable images (counted, recorded) instead of refusing the folder
    skip_bad_images: bool = False

    def __post_init__(self):
        if self.model_options is None:
            self.model_options = {}

    def resolve(self) -> TrainSettings:
        """A validated copy with the recipe's values for every ``None`` hyper-parameter."""
        # The numbers have their own checks below (which say "positive", "finite", ">= 0").
        fields = [f for f in dataclasses.fields(self) if f.name not in _NUMBERS]
        check_argument_types({f.name: getattr(self, f.name) for f in fields},
                             {f.name: f.type for f in fields})
        if not isinstance(self.model_options, dict):
            raise KodeError(f"model_options must be a dict of builder arguments, got "
                            f"{self.model_options!r}")
        if self.verbose not in ("auto", 0, 1, 2) or isinstance(self.verbose, bool):
            raise KodeError(f"verbose must be 'auto', 0, 1 or 2, got {self.verbose!r}")
        if self.jit_compile not in JIT_COMPILE and not isinstance(self.jit_compile, bool):
            raise KodeError(f"jit_compile must be one of {', '.join(JIT_COMPILE)} (or True/"
                            f"False), got {self.jit_compile!r}")
        import tensorflow as tf

        if not isinstance(self.strategy, str | tf.distribute.Strategy):
            raise KodeError(f"strategy must be a name ({', '.join(STRATEGIES)}) or a "
                            f"tf.distribute.Strategy, got {self.strategy!r}")
        kind = dataset_kind(self.dataset)  # the canonical message for unknown names
        if kind == "builtin":
            dataset = self.dataset.strip().lower()
            recipe = RECIPES[dataset]
            if self.image_size is not None:
                raise KodeError(f"image_size is for folders and tfds:NAME datasets; "
                                f"{dataset} has its own size")
        else:  # a path keeps its case
            dataset = os.fspath(self.dataset) if kind == "folder" else self.dataset.strip()
            recipe = OWN_DATA_RECIPE
        _check_positive("image_size", self.image_size)
        split = self.validation_split
        if not (_is_number(split) and 0 < split < 1):
            raise KodeError(f"validation_split must be a number in (0, 1), got {split!r}")
        s = dataclasses.replace(self, dataset=dataset, model_options=dict(self.model_options))
        for name in ("epochs", "batch_size", "lr", "schedule", "weight_decay", "momentum"):
            if getattr(s, name) is None:
                setattr(s, name, getattr(recipe, name))
        _check_positive("epochs", s.epochs)
        _check_positive("batch_size", s.batch_size)
        _check_positive("steps_per_epoch", s.steps_per_epoch)
        _check_positive("lr", s.lr, float)
        _check_non_negative("weight_decay", s.weight_decay)
        _check_non_negative("momentum", s.momentum)
        if s.schedule not in SCHEDULES:
            raise KodeError(f"unknown schedule '{s.schedule}'; choose one of "
                            f"{', '.join(SCHEDULES)}")
        from kode.gradients import GRADIENT_MODES
        from kode.tools.guard import check_tolerance

        if s.gradient not in GRADIENT_MODES:
            raise KodeError(f"unknown gradient '{s.gradient}'; choose one of "
                            f"{', '.join(GRADIENT_MODES)}")
        check_tolerance(s.guard_tolerance)
        _check_positive("guard_every", s.guard_every)
        if s.on_inaccurate not in ("stop", "fallback"):
            raise KodeError(f"on_inaccurate must be 'stop' or 'fallback', got "
                            f"{s.on_inaccurate!r}")
        if s.precision not in PRECISIONS:
            raise KodeError(f"unknown precision '{s.precision}'; choose one of "
                            f"{', '.join(PRECISIONS)}")
        if isinstance(s.strategy, str) and s.strategy not in STRATEGIES:
            raise KodeError(f"unknown strategy '{s.strategy}'; choose one of "
                            f"{', '.join(STRATEGIES)}")
        if s.connect_timeout is not None:
            _check_positive("connect_timeout", s.connect_timeout, float)
        _check_positive("devices", s.devices)
        return s

    @property
    def strategy_name(self) -> str:
        return self.strategy if isinstance(self.strategy, str) else type(self.strategy).__name__

    def fingerprint(self) -> dict:
        """What must be equal for a checkpoint of another process to be resumed."""
        fingerprint = {
            "model": self.model, "dataset": self.dataset, "epochs": self.epochs,
            "batch_size": self.batch_size, "lr": self.lr, "schedule": self.schedule,
            "weight_decay": self.weight_decay, "momentum": self.momentum,
            "decay_lm_k": self.decay_lm_k, "seed": self.seed, "augment": self.augment,
            "model_options": self.model_options, "gradient": self.gradient,
            "precision": self.precision}
        if not self.recompute:  # absent when on: older checkpoints still match
            fingerprint["recompute"] = False
        if self.steps_per_epoch is not None:  # absent when unset: older checkpoints still match
            fingerprint["steps_per_epoch"] = self.steps_per_epoch
        return fingerprint

    def to_dict(self) -> dict:
        """JSON-able: the strategy as its name."""
        return {**asdict(dataclasses.replace(self, strategy=None)),
                "strategy": self.strategy_name}


def keyword_signature(settings_cls: type, first: str, *, skip: tuple[str, ...],
                      defaults: dict | None = None) -> inspect.Signature:
    """The signature of an entry point over ``settings_cls``: ``(first, dataset="digits", *,
    validation=None, <every other settings field>)``, shown by help() and IDEs instead of
    ``**settings``."""
    fields = [p for p in inspect.signature(settings_cls).parameters.values() if p.name not in skip]
    defaults = defaults or {}
    return inspect.Signature(
        [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
         inspect.Parameter("dataset", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="digits",
                           annotation="str | tuple"),
         inspect.Parameter("validation", inspect.Parameter.KEYWORD_ONLY, default=None,
                           annotation="tuple | None"),
         *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(p.name, p.default))
           for p in fields]],
        return_annotation=TrainResult,
    )
