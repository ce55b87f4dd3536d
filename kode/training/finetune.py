"""Fine-tune a pretrained network on a dataset: ``kode finetune`` and ``kode.finetune(...)``.

The training run is :class:`kode.training.TrainingPipeline`'s, unchanged (optimizer, schedule,
gradient guard, checkpoints and resume, diagnostics, atomic saves, verified export); only
three of its steps differ:

- :meth:`FinetunePipeline.build_model`: the source network (a ``.keras`` file, a zoo name with
  a weights file, or a keras.applications ResNet with a weights file or ``"imagenet"``),
  ported into kode stages (:func:`kode.port.port_model`), its head replaced by a new dense
  softmax for the dataset's classes, refined ×m (:func:`kode.tools.refine.refine`; with
  ``refine="auto"`` m is chosen by :func:`kode.tools.refine.choose_factor` on the gradient
  guard's batch and tolerance, its table printed and recorded), every stage set to the run's
  gradient mode, and the stem plus the first ``freeze`` stages frozen;
- :meth:`FinetunePipeline.load_data`: images are brought to what the source network expects:
  its input size (bilinear resize), its channels (gray → RGB) and its preprocessing
  (keras.applications V2: x/127.5 − 1; V1: caffe; kode models: the dataset's mean/std);
- :meth:`FinetunePipeline.metadata`: ``kode.json`` names that preprocessing, so the exported
  SavedModel applies it in its graph to raw 0–255 images of the source's input size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError
from kode.io import check_keras_file, load_keras_file, read_sidecar
from kode.training.pipeline import TrainingPipeline
from kode.training.settings import TrainResult, TrainSettings, keyword_signature

#: keras.applications ResNets are used at this input size unless ``input_size`` says otherwise.
KERAS_DEFAULT_SIZE = 224

#: Stages of a ported keras.applications ResNet (conv2_x … conv5_x).
KERAS_STAGES = 4


@dataclass
class FinetuneSettings(TrainSettings):
    """:class:`~kode.training.TrainSettings` plus what the source network is and how it is
    adapted. ``model`` only names the run (logdir, export, ``kode.json``)."""

    source: str = ""
    weights: str | None = None  #: zoo / keras.applications sources: a file or "imagenet"
    refine: int | str = 1  #: refinement factor m (1: none), or "auto" (needs the adjoint)
    freeze: int | str = 0  #: "stem", or the number of leading stages frozen with the stem
    input_size: int | None = None  #: side of the source's input (default: the source's own)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "source": self.source, "weights": self.weights,
                "refine": self.refine, "freeze": self.freeze, "input_size": self.input_size}


@dataclass(frozen=True)
class Source:
    """How to build the source network, resolved from the settings before any data is read."""

    kind: str  # "keras_file" | "zoo" | "keras_applications"
    name: str
    preprocessing: dict | None  # None: the dataset's own normalization
    input_shape: tuple | None  # None: the dataset's shape (zoo) / the file's (keras_file)


def resolve_source(settings: FinetuneSettings) -> Source:
    """Classify ``settings.source`` and check its weights and options (no model built)."""
    import zoo
    from kode.tools.refine import check_refine
    from zoo.keras_resnet.applications import KERAS_RESNETS, _arch_key

    source, weights = settings.source, settings.weights
    if check_refine(settings.refine) == "auto" and settings.gradient != "adjoint":
        raise KodeError("--refine auto chooses m by the adjoint's gradient error; it needs "
                        f"--gradient adjoint (got '{settings.gradient}'): give an integer m")
    freeze = settings.freeze
    if not (freeze == "stem" or (isinstance(freeze, int) and not isinstance(freeze, bool)
                                 and freeze >= 0)):
        raise KodeError(f"freeze must be 'stem' or a number of stages >= 0, got {freeze!r}")
    if settings.input_size is not None and (
            not isinstance(settings.input_size, int) or settings.input_size < 8):
        raise KodeError(f"input_size must be an integer >= 8, got {settings.input_size!r}")
    if not isinstance(source, str) or not source:
        raise KodeError("a source is required: a .keras file, a zoo model name or a "
                        "keras.applications ResNet name (e.g. ResNet50V2)")
    if source.endswith(".keras"):
        check_keras_file(source)  # before the run folder, the data and TensorFlow's runtime
        if weights is not None:
            raise KodeError("--weights is for zoo and keras.applications sources; a .keras "
                            "file holds its weights")
        meta = read_sidecar(source) or {}
        preprocessing = meta.get("preprocessing")
        if preprocessing is None and "mean" in meta and "std" in meta:
            from kode.serving.preprocessing import mean_std

            preprocessing = mean_std(meta["mean"], meta["std"])
        return Source("keras_file", source, preprocessing, None)
    key = source.lower().removeprefix("keras_")
    if key in KERAS_RESNETS:
        if weights is not None and weights != "imagenet" and not os.path.isfile(weights):
            raise KodeError(f"weights file '{weights}' does not exist")
        if settings.gradient == "adjoint" and not key.endswith("v2"):
            raise KodeError(
                f"gradient 'adjoint' cannot train {KERAS_RESNETS[key][0]}: it is a "
                "post-activation ResNet, relu(x + f(x)) is not invertible, so its stages "
                "cannot be rebuilt backwards; use --gradient checkpoint (exact, O(√N) memory) "
                "or a V2 (pre-activation) ResNet")
        size = settings.input_size or KERAS_DEFAULT_SIZE
        from zoo.keras_resnet.applications import keras_resnet_preprocessing

        return Source("keras_applications", _arch_key(key), keras_resnet_preprocessing(key),
                      (size, size, 3))
    try:
        zoo.get_entry(source)
    except KodeError:
        raise KodeError(
            f"unknown source '{source}': give a .keras file, a zoo model name (see `kode "
            "models`) or a keras.applications ResNet ("
            + ", ".join(v for v, _ in KERAS_RESNETS.values()) + ")") from None
    if weights is None:
        raise KodeError(f"zoo source '{source}' needs --weights FILE (a .keras or .weights.h5 "
                        "file of that model); without it there is nothing to fine-tune")
    if weights == "imagenet" or not os.path.isfile(weights):
        raise KodeError(f"weights file '{weights}' does not exist")
    if weights.endswith(".keras"):
        check_keras_file(weights)
    return Source("zoo", source, None, None)


def _load_source(source: Source, settings: FinetuneSettings, info) -> keras.Model:
    """The source network, ported (its layers reused, no second copy of the weights)."""
    import zoo
    from kode.tools.port import port_model
    from zoo.keras_resnet.applications import keras_resnet

    if source.kind == "keras_applications":
        # Headless: a file with the 1000-class head is read by a model with the head, then cut.
        try:
            return keras_resnet(source.name, include_top=False, pooling="avg",
                                weights=settings.weights, input_shape=source.input_shape,
                                recompute=False)
        except KodeError as first:
            if settings.weights in (None, "imagenet"):
                raise
            try:
                return keras_resnet(source.name, weights=settings.weights,
                                    input_shape=source.input_shape, recompute=False)
            except KodeError:
                raise first from None
    if source.kind == "keras_file":
        return port_model(load_keras_file(source.name), copy=False, segments=False)
    shape = (*((settings.input_size,) * 2 if settings.input_size else info.input_shape[:2]),
             info.input_shape[2])
    entry = zoo.get_entry(source.name)
    sidecar = (read_sidecar(settings.weights) if settings.weights else None) or {}
    errors = []
    for classes in dict.fromkeys([sidecar.get("num_classes"), entry.defaults.get("classes"),
                                  info.num_classes, 10, 1000]):
        if not isinstance(classes, int):
            continue
        try:
            return zoo.create_model(source.name, input_shape=shape, classes=classes,
                                    weights=settings.weights)
        except KodeError as err:
            errors.append(str(err))
    raise KodeError(f"weights file '{settings.weights}' does not fit zoo model "
                    f"'{source.name}' (weights of another architecture?): {errors[0]}")


def _with_new_head(model: keras.Model, classes: int) -> keras.Model:
    """The source's features (the input of its last dense layer, else its pooled output)
    → a new dense softmax for ``classes``."""
    from kode.tools.port import _Graph

    # The model's own node of its last layer: a ported model may share its layers with the
    # source model, so ``layer.input`` could be the source's tensor.
    last, node = _Graph(model).nodes[-1]
    features = (node.input_tensors[0] if isinstance(last, keras.layers.Dense)
                else node.output_tensors[0])
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="finetune_pool")(features)
    elif len(features.shape) != 2:
        raise KodeError(f"source '{model.name}' gives features of shape {features.shape}; "
                        "expected a feature map or a vector")
    outputs = keras.layers.Dense(classes, activation="softmax",
                                 name="finetune_predictions")(features)
    return keras.Model(model.inputs, outputs, name=model.name)


def freeze_layers(model: keras.Model, freeze: int | str) -> list[str]:
    """Freeze the layers before the first stage ("stem") or up to and including stage
    ``freeze`` (with everything before it); returns the names of the frozen layers."""
    from kode.layers.stage import IntegratorStage

    if freeze == 0:
        return []
    layers = [lay for lay in model.layers if not isinstance(lay, keras.layers.InputLayer)]
    stages = [i for i, lay in enumerate(layers) if isinstance(lay, IntegratorStage)]
    if not stages:
        raise KodeError(f"model '{model.name}' has no stage to freeze up to")
    if freeze == "stem":
        end = stages[0]
    elif freeze > len(stages):
        raise KodeError(f"freeze {freeze}: the model has only {len(stages)} stages")
    else:
        end = stages[freeze - 1] + 1
    for layer in layers[:end]:
        layer.trainable = False
    return [lay.name for lay in layers[:end]]


class FinetunePipeline(TrainingPipeline):
    """The training pipeline with a pretrained source instead of a fresh zoo model."""

    settings: FinetuneSettings

    refine_choice = None  #: what ``refine="auto"`` measured and chose (RefineChoice)

    def check_model(self) -> None:
        import zoo

        s = self.settings
        self.source = source = resolve_source(s)
        if source.kind == "keras_applications":  # its input size, its gradient modes
            zoo.check_model(f"keras_{source.name}", input_shape=source.input_shape,
                            gradient=s.gradient)
            if isinstance(s.freeze, int) and s.freeze > KERAS_STAGES:
                raise KodeError(f"freeze {s.freeze}: the model has only {KERAS_STAGES} stages")

    def default_image_size(self) -> int:
        """A folder's images are read at the source's input size (no second resize)."""
        source = getattr(self, "source", None) or resolve_source(self.settings)
        if source.input_shape is not None:
            return int(source.input_shape[0])
        if source.kind == "keras_file":
            # kode.json's input shape: loading the model would start TensorFlow's runtime
            # before the strategy is made.
            shape = (read_sidecar(source.name) or {}).get("input_shape")
            return int(shape[0]) if shape else int(load_keras_file(source.name).input_shape[1])
        if self.settings.input_size:
            return int(self.settings.input_size)
        import zoo
        from zoo.builder import DEFAULT_INPUT_SHAPE

        return DEFAULT_INPUT_SHAPE[zoo.get_entry(source.name).defaults.get("layout", "cifar")][0]

    def load_data(self) -> None:
        super().load_data()
        self.input_shape = self._input_shape()
        self.adapt = self._adapter()
        if self.adapt is not None:
            self.train_ds = self.train_ds.map(lambda x, y: (self.adapt(x), y),
                                              num_parallel_calls=tf.data.AUTOTUNE)
            self.test_ds = self.test_ds.map(lambda x, y: (self.adapt(x), y),
                                            num_parallel_calls=tf.data.AUTOTUNE)

    def _input_shape(self) -> tuple:
        source, info = self.source, self.info
        if source.input_shape is not None:
            return tuple(source.input_shape)
        if source.kind == "keras_file":
            shape = load_keras_file(source.name).input_shape[1:]
            return tuple(shape)
        size = self.settings.input_size
        return (size, size, info.input_shape[2]) if size else tuple(info.input_shape)

    def _adapter(self):
        """Dataset-normalized images → the source's size, channels and preprocessing."""
        info, shape, preprocessing = self.info, self.input_shape, self.source.preprocessing
        if tuple(info.input_shape) == shape and preprocessing is None:
            return None
        if shape[2] not in (info.input_shape[2], 3) or info.input_shape[2] not in (1, shape[2]):
            raise KodeError(f"the source takes {shape[2]} channels; {info.name} images have "
                            f"{info.input_shape[2]}")
        from kode.serving.preprocessing import apply_preprocessing, check_preprocessing, mean_std

        target = check_preprocessing(preprocessing or mean_std(info.mean, info.std), shape[2])
        mean = tf.constant(np.asarray(info.mean, np.float32))
        std = tf.constant(np.asarray(info.std, np.float32))

        def adapt(x):
            pixels = (x * std + mean) * 255.0  # back to 0–255 pixels
            if tuple(pixels.shape[1:3]) != shape[:2]:
                pixels = tf.image.resize(pixels, shape[:2], method="bilinear")
            if pixels.shape[-1] != shape[2]:
                pixels = tf.image.grayscale_to_rgb(pixels)
            return apply_preprocessing(target, pixels)

        self.preprocessing = target
        return adapt

    def callbacks(self) -> list[keras.callbacks.Callback]:
        callbacks = super().callbacks()
        if self.guard is not None and self.adapt is not None:
            self.guard.x = self.adapt(tf.convert_to_tensor(self.guard.x))
        return callbacks

    def build_model(self, info) -> keras.Model:
        from kode.layers.stage import set_gradient_mode
        from kode.tools.refine import refine
        from kode.tools.segments import cut_at_stages

        s = self.settings
        model = _with_new_head(_load_source(self.source, s, info), info.num_classes)
        if s.refine == "auto":
            from kode.tools.refine import choose_factor

            freeze_layers(model, s.freeze)  # frozen stages train no gradient: not counted
            x, y = self.guard_batch()
            self.refine_choice = choose_factor(model, x, y, s.guard_tolerance, log=print)
            model = self.refine_choice.model
        elif s.refine != 1:
            model = refine(model, s.refine)
        # The new head in place and the stages refined: the layers between the stages are cut
        # into segments that the memory-saving modes recompute.
        model = cut_at_stages(model)
        set_gradient_mode(model, s.gradient, s.recompute)
        self.frozen = freeze_layers(model, s.freeze)
        return model

    def guard_batch(self) -> tuple:
        """The batch the gradient guard checks (the first 32 of a second instance of the
        training data, brought to the source's input)."""
        x, y = next(iter(self.load_dataset(cache=False)[0]))
        x, y = x[:32], y[:32]
        return (self.adapt(x) if self.adapt is not None else x), y

    def config(self) -> dict:
        config = super().config()
        if self.refine_choice is not None:
            config["refine_choice"] = self.refine_choice.as_dict()
        return config

    def metadata(self) -> dict:
        meta = super().metadata()
        meta["input_shape"] = list(self.input_shape)
        if self.adapt is not None:  # the source's, which replaces the dataset's mean/std
            meta.pop("mean", None)
            meta.pop("std", None)
            meta["preprocessing"] = self.preprocessing
        meta["finetune"] = {"source": self.source.name, "kind": self.source.kind,
                            "weights": self.settings.weights,
                            "refine": (self.refine_choice.factor if self.refine_choice
                                       else self.settings.refine),
                            "freeze": self.settings.freeze, "frozen_layers": len(self.frozen)}
        if self.refine_choice is not None:
            meta["finetune"]["refine_requested"] = "auto"
        return meta


def settings_from(train: TrainSettings, **fields) -> FinetuneSettings:
    """``train``'s settings (what ``kode train``'s options give) plus the finetune fields."""
    import dataclasses

    return FinetuneSettings(**{f.name: getattr(train, f.name)
                               for f in dataclasses.fields(TrainSettings)}, **fields)


def finetune(source: str, dataset: str | tuple = "digits", *, validation: tuple | None = None,
             **settings) -> TrainResult:
    """Fine-tune ``source`` on ``dataset``: the keywords of :class:`FinetuneSettings`
    (``weights``, ``refine``, ``freeze``, ``input_size``) plus every keyword of
    :func:`kode.train` (``gradient``, ``epochs``, ``lr``, ``export_dir``, ...).

    The run is ``kode train``'s pipeline with the source network in place of a zoo model;
    ``dataset`` and ``validation`` are :func:`kode.train`'s.
    """
    from kode.training.run_data import dataset_name

    name = settings.pop("model", None) or run_name(source)
    return FinetunePipeline(FinetuneSettings(name, dataset_name(dataset, validation),
                                             source=source, **settings)).run()


def run_name(source: str) -> str:
    """``finetune_<source>``: the zoo/keras.applications name, or for a ``.keras`` file the
    model named in its ``kode.json`` (else the file name)."""
    source = str(source)
    base = os.path.basename(source).removesuffix(".keras") or "model"
    if source.endswith(".keras"):
        base = str((read_sidecar(source) or {}).get("model") or base)
    return f"finetune_{base.lower()}"


finetune.__signature__ = keyword_signature(FinetuneSettings, "source",
                                           skip=("dataset", "source"), defaults={"model": None})

