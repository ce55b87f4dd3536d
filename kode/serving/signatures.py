"""The serving graph: kode's SavedModel signatures and the checks that they reproduce Keras.

Serving contract (the same for ``kode train --export``, ``kode.train(export_dir=...)`` and
``kode export``; recorded in ``kode.json`` under ``"serving"``)::

    signature              input "images"                          preprocessing
    serving_default        float32 [batch, H, W, C], pixels 0-255  in the graph
    serving_uint8          uint8   [batch, H, W, C], pixels 0-255  in the graph  (images only)
    serving_preprocessed   float32 [batch, H, W, C], preprocessed  none (what Keras takes)

    outputs: "probabilities" float32 [batch, classes] (a softmax is applied in the graph when
             the model outputs logits) and "class_ids" int64 [batch] (argmax).
             A model that is not a classifier (no softmax/sigmoid/linear last layer, or several
             outputs) returns its raw output as "outputs" (or "output_0", "output_1", ...).

H x W x C is the model's input size (the graph does not resize). The in-graph preprocessing is
``kode.json["preprocessing"]`` (see :mod:`kode.preprocessing`): from ``metadata`` key
``"preprocessing"``, else from ``"mean"``/``"std"`` ((x / 255 - mean) / std, as every kode
dataset), else ``{"kind": "identity"}``: a model exported without preprocessing information
gets its inputs unchanged, so ``serving_default`` computes exactly ``model(images)``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kode.compat import input_signature
from kode.errors import KodeError, one_line
from kode.serving.preprocessing import IDENTITY, apply_preprocessing, check_preprocessing, mean_std

SIGNATURE = "serving_default"  # raw pixels, float32


SIGNATURE_UINT8 = "serving_uint8"  # raw pixels, uint8


SIGNATURE_PREPROCESSED = "serving_preprocessed"  # what the Keras model takes


INPUT_KEY = "images"


# Activations whose outputs are already probabilities, and those that give logits.
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


_LOGIT_ACTIVATIONS = ("linear", "none", "logits")


_PIXEL_MAX = 255


# What the signatures return: "probabilities" (the model outputs probabilities), "logits" (a
# softmax is applied in the graph), "outputs" (not a classifier: raw outputs).
_HEADS = ("probabilities", "logits", "outputs")


def _head_kind(meta: dict, model: keras.Model, reference: Any) -> str:
    flat = keras.tree.flatten(reference)
    activation = meta.get("classifier_activation", _infer_classifier_activation(model))
    activation = activation.lower() if isinstance(activation, str) else None
    if len(flat) != 1 or len(flat[0].shape) != 2:
        return "outputs"
    if activation in _PROBABILITY_ACTIVATIONS:
        return "probabilities"
    if activation in _LOGIT_ACTIVATIONS:
        return "logits"
    return "outputs"


def _head_outputs(outputs: Any, head: str) -> dict[str, tf.Tensor]:
    """The signature outputs from the Keras outputs (in a graph or eagerly)."""
    flat = keras.tree.flatten(outputs)
    if head == "outputs":
        if len(flat) == 1:
            return {"outputs": flat[0]}
        return {f"output_{i}": t for i, t in enumerate(flat)}
    scores = tf.cast(flat[0], tf.float32)
    probabilities = tf.nn.softmax(scores, axis=-1) if head == "logits" else scores
    return {"probabilities": probabilities, "class_ids": tf.argmax(probabilities, axis=-1)}


def _raw_signatures(spec: tf.TensorSpec) -> list[str]:
    return [SIGNATURE, SIGNATURE_UINT8] if spec.shape.rank == 4 else [SIGNATURE]


def _write_savedmodel(
    model: keras.Model, path: str, spec: tf.TensorSpec, preprocessing: dict, head: str
) -> None:
    """Write the SavedModel with the three signatures of the serving contract."""
    shape = spec.shape

    @tf.function(input_signature=[tf.TensorSpec(shape, spec.dtype, name=INPUT_KEY)])
    def preprocessed(images):
        return _head_outputs(model(images, training=False), head)

    def raw(images):
        return preprocessed(tf.cast(apply_preprocessing(preprocessing, images), spec.dtype))

    archive = keras.export.ExportArchive()
    archive.track(model)
    try:
        archive.add_endpoint(SIGNATURE_PREPROCESSED, preprocessed)
        archive.add_endpoint(
            SIGNATURE, raw, input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_KEY)]
        )
        if SIGNATURE_UINT8 in _raw_signatures(spec):
            archive.add_endpoint(
                SIGNATURE_UINT8, raw,
                input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT_KEY)],
            )
        archive.write_out(path, verbose=False)
    except Exception as exc:  # Keras/TF raise ValueError/TypeError/... for unexportable models
        raise KodeError(f"model {model.name!r} could not be exported: {one_line(exc)}") from exc


def _serving_description(spec: tf.TensorSpec, head: str, outputs: dict) -> dict:
    dims = [None if d is None else int(d) for d in spec.shape]
    size = " x ".join("?" if d is None else str(d) for d in dims[1:])
    raw = f"batch x {size}, pixel values 0-{_PIXEL_MAX} as a client sends them; preprocessed " \
          "in the graph as 'preprocessing' says"
    docs = {
        SIGNATURE: ("float32", f"float32 {raw}"),
        SIGNATURE_UINT8: ("uint8", f"uint8 {raw}"),
        SIGNATURE_PREPROCESSED: (
            spec.dtype.name, f"{spec.dtype.name} batch x {size}, already preprocessed "
            "(what the Keras model takes)"),
    }
    signatures = {
        sig: {"inputs": {INPUT_KEY: {"dtype": dtype, "shape": dims}}, "description": text}
        for sig, (dtype, text) in docs.items()
        if sig in (*_raw_signatures(spec), SIGNATURE_PREPROCESSED)
    }
    out_docs = {
        key: {"dtype": tf.as_dtype(t.dtype).name,
              "shape": [None, *[int(d) for d in t.shape[1:]]]}
        for key, t in outputs.items()
    }
    return {
        "signature": SIGNATURE,
        "input_key": INPUT_KEY,
        "output_keys": list(outputs),
        "head": head,
        "signatures": signatures,
        "outputs": out_docs,
    }


def _preprocessing_from_metadata(meta: dict, input_shape: list) -> dict:
    channels = input_shape[-1] if input_shape else None
    given = meta.get("preprocessing")
    from_mean_std = None
    if "mean" in meta or "std" in meta:
        from_mean_std = check_preprocessing(
            mean_std(meta.get("mean", 0.0), meta.get("std", 1.0)), channels)
    if given is None:
        return from_mean_std or dict(IDENTITY)
    checked = check_preprocessing(given, channels)
    if from_mean_std is not None and checked != from_mean_std:
        raise KodeError(
            f"metadata preprocessing={given!r} contradicts its mean/std (mean="
            f"{meta.get('mean')!r}, std={meta.get('std')!r})"
        )
    return checked


def _raw_check_inputs(check_inputs: np.ndarray, preprocessing: dict) -> np.ndarray:
    if preprocessing["kind"] == "identity":
        return check_inputs
    rng = np.random.default_rng(_CHECK_SEED + 1)
    return rng.integers(0, _PIXEL_MAX + 1, size=check_inputs.shape).astype(np.float32)


def _compare_outputs(
    loaded: Any, path: str, signature: str, inputs: np.ndarray, expected: dict
) -> float:
    """max |signature(inputs) - expected| over the float outputs (NaN if any is NaN)."""
    signatures = getattr(loaded, "signatures", {})
    if signature not in signatures:
        raise KodeError(f"{path} has no {signature!r} signature (has {sorted(signatures)})")
    fn = signatures[signature]
    dtype = fn.structured_input_signature[1][INPUT_KEY].dtype
    try:
        served = fn(**{INPUT_KEY: tf.constant(np.asarray(inputs), dtype=dtype)})
    except Exception as exc:
        raise KodeError(f"{path}: SavedModel inference failed: {one_line(exc)}") from exc
    if sorted(served) != sorted(expected):
        raise KodeError(f"{path}: outputs {sorted(served)}, expected {sorted(expected)}")
    diffs = [0.0]
    for key, ref in expected.items():
        a = np.asarray(served[key], dtype=np.float64)
        b = np.asarray(ref, dtype=np.float64)
        if a.shape != b.shape:
            raise KodeError(f"{path}: output {key} has shape {a.shape}, Keras gives {b.shape}")
        if key != "class_ids" and a.size:  # class ids: argmax of the compared probabilities
            diffs.append(float(np.max(np.abs(a - b))))
    return float("nan") if any(np.isnan(diffs)) else max(diffs)


def _fmt_shape(shape: Any) -> str:
    dims = list(shape) if not isinstance(shape, tf.TensorShape) else shape.as_list()
    return "(" + ", ".join("None" if d is None else str(d) for d in dims) + ")"


def _model_input_spec(model: keras.Model) -> tf.TensorSpec:
    """The (batch-polymorphic) input spec of a single-input model, as ``model.export`` finds it."""
    try:
        signature = input_signature(model)
    except (TypeError, ValueError) as exc:
        raise KodeError(f"model {model.name!r} cannot be exported: {one_line(exc)}") from exc
    flat = keras.tree.flatten(signature)
    if len(flat) != 1:
        raise KodeError(f"model {model.name!r} has {len(flat)} inputs; only 1 is supported")
    shape = [None, *flat[0].shape[1:]]
    return tf.TensorSpec(shape, tf.as_dtype(flat[0].dtype or "float32"))


_CHECK_SEED = 0


def _infer_classifier_activation(model: keras.Model) -> str | None:
    layers = getattr(model, "layers", None) or []
    if not layers:
        return None
    last = layers[-1]
    if type(last).__name__ == "Softmax":
        return "softmax"
    fn = getattr(last, "activation", None)
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else None
