"""Export a Keras model as a verified SavedModel with kode's serving signatures.

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

``kode.json`` holds whatever the caller passes as ``metadata`` (JSON-serializable; numpy scalars
and arrays are converted) plus what is known from the model: ``name`` (the export name),
``model_name``, ``input_shape`` (per example, without the batch axis), ``preprocessing``,
``serving``, ``keras_version``, ``tensorflow_version`` and, unless given,
``classifier_activation`` (inferred from the last layer when it has an ``activation``).
:func:`predict_files` also reads ``class_names`` (list of str).

Where the SavedModel goes (versions, temporary folders, locks): :mod:`kode.serving.publish`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kode.compat import input_signature
from kode.errors import KodeError, one_line
from kode.io import load_keras_file, read_sidecar
from kode.serving.preprocessing import IDENTITY, apply_preprocessing, check_preprocessing, mean_std
from kode.serving.publish import (
    _check_name,
    _check_version,
    _fsync_tree,
    _keep_refused,
    _load_savedmodel,
    _make_tmp_dir,
    _prepare_model_dir,
    _publish,
    _refuse_existing,
    _resolve_savedmodel,
    _write_metadata,
    load_metadata,
    remove_stale_exports,
)

__all__ = ["ExportResult", "INPUT_KEY", "export_keras_file", "export_model", "verify_export"]


SIGNATURE = "serving_default"  # raw pixels, float32


SIGNATURE_UINT8 = "serving_uint8"  # raw pixels, uint8


SIGNATURE_PREPROCESSED = "serving_preprocessed"  # what the Keras model takes


INPUT_KEY = "images"


_CHECK_BATCH = 4


_CHECK_SEED = 0


# Activations whose outputs are already probabilities, and those that give logits.
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


_LOGIT_ACTIVATIONS = ("linear", "none", "logits")


_PIXEL_MAX = 255


@dataclass(frozen=True)
class ExportResult:
    """Outcome of :func:`export_model`."""

    path: str  # .../<name>/<version>
    version: int
    max_abs_diff: float  # SavedModel vs Keras model on the check batches, all signatures


def export_model(
    model: keras.Model,
    export_dir: str = "saved_models",
    name: str | None = None,
    version: int | None = None,
    *,
    metadata: dict | None = None,
    check_inputs: np.ndarray | None = None,
    atol: float = 1e-5,
) -> ExportResult:
    """Export ``model`` to ``<export_dir>/<name>/<version>/`` and verify the result.

    Args:
        model: a built Keras model with a single input.
        export_dir: base folder (created if needed).
        name: model folder name; defaults to ``model.name``. Letters, digits, ``._-``.
        version: integer version folder (>= 0). ``None`` picks the next free one (1 if there is
            none, else the largest existing version + 1). An existing version is never
            overwritten.
        metadata: extra JSON-serializable information (class names, ``preprocessing`` or
            ``mean``/``std``, dataset, ...) stored in ``<version>/assets.extra/kode.json``
            together with what is known from the model.
        check_inputs: a *preprocessed* batch (what the Keras model takes) used to compare
            ``serving_preprocessed`` with the Keras model. Default: a deterministic
            standard-normal float32 batch of 4 with the model's input shape. The raw-pixel
            signatures are checked on deterministic random pixels 0-255 of the same shape
            (on ``check_inputs`` itself for the identity preprocessing).
        atol: largest accepted absolute difference between SavedModel and Keras outputs.

    Returns:
        An :class:`ExportResult` with the version folder path, the version and the difference.

    Raises:
        KodeError: bad arguments, an unwritable export folder, an existing version, or a
            SavedModel that does not reproduce the Keras model within ``atol`` (the SavedModel
            is then moved to ``<name>/.refused-*``, outside the Serving layout, for inspection,
            and the message names it).
    """
    if not isinstance(model, keras.Model):
        raise KodeError(f"expected a keras.Model to export, got {type(model).__name__}")
    if not model.built:
        raise KodeError(f"model {model.name!r} is not built; call it on data or build it first")
    name = model.name if name is None else name
    _check_name(name)
    if version is not None:
        _check_version(version)
    atol = _check_atol(atol)
    user_meta = _jsonable_metadata(metadata)
    spec = _model_input_spec(model)
    input_shape = [None if d is None else int(d) for d in spec.shape[1:]]
    if check_inputs is not None:
        check_inputs = _as_float_array(check_inputs, "check_inputs")
        _check_batch_shape(check_inputs.shape, input_shape, "check_inputs")
    elif None in input_shape:
        raise KodeError(
            f"model input shape {_fmt_shape(input_shape)} has unknown dimensions; pass check_inputs"
        )
    else:
        rng = np.random.default_rng(_CHECK_SEED)
        check_inputs = rng.standard_normal((_CHECK_BATCH, *input_shape)).astype(np.float32)
    preprocessing = _preprocessing_from_metadata(user_meta, input_shape)
    # Each signature with its check batch: preprocessed, raw float pixels, raw uint8 pixels.
    batches = {SIGNATURE_PREPROCESSED: check_inputs}
    batches[SIGNATURE] = _raw_check_inputs(check_inputs, preprocessing)
    if SIGNATURE_UINT8 in _raw_signatures(spec):
        batches[SIGNATURE_UINT8] = np.clip(np.round(batches[SIGNATURE]), 0, _PIXEL_MAX)
    try:
        reference = model(tf.constant(check_inputs, dtype=spec.dtype), training=False)
        head = _head_kind(user_meta, model, reference)
        expected = {SIGNATURE_PREPROCESSED: _head_outputs(reference, head)}
        for sig in _raw_signatures(spec):
            x = tf.cast(apply_preprocessing(preprocessing, batches[sig]), spec.dtype)
            expected[sig] = _head_outputs(model(x, training=False), head)
    except KodeError:
        raise
    except Exception as exc:
        raise KodeError(
            f"Keras model {model.name!r} failed on the check inputs: {one_line(exc)}"
        ) from exc
    outputs = expected[SIGNATURE_PREPROCESSED]
    meta = _full_metadata(user_meta, model, name, input_shape, preprocessing,
                          _serving_description(spec, head, outputs))
    _check_class_names(meta, outputs)

    # Up front: the folder exists, is a folder, is writable, and the version is free.
    model_dir = _prepare_model_dir(export_dir, name)
    if version is not None:
        _refuse_existing(model_dir, version)
    remove_stale_exports(model_dir)
    tmp, owner = _make_tmp_dir(model_dir, version)
    try:
        # Export into a fresh subfolder rather than into ``tmp`` itself: mkdtemp creates ``tmp``
        # with mode 0700, which a Serving process running as another user could not read.
        export_path = os.path.join(tmp, "model")
        _write_savedmodel(model, export_path, spec, preprocessing, head)
        _write_metadata(export_path, meta)
        _fsync_tree(tmp)

        loaded = _load_savedmodel(export_path)
        diffs = [_compare_outputs(loaded, export_path, sig, batches[sig], expected[sig])
                 for sig in batches]
        diff = float("nan") if np.isnan(diffs).any() else max(diffs)
        if not diff <= atol:  # also catches NaN
            refused = _keep_refused(export_path, model_dir, tmp)
            raise KodeError(
                f"exported SavedModel differs from the Keras model by max |diff| = {diff:.3g} "
                f"> atol = {atol:g}; not published as a version, kept for inspection at "
                f"{refused}"
            )
        final_version, final_path = _publish(export_path, model_dir, version)
    finally:
        # Remove the folder while still holding its lock, so no cleaner sees it unlocked.
        shutil.rmtree(tmp, ignore_errors=True)
        owner.close()
    return ExportResult(path=final_path, version=final_version, max_abs_diff=float(diff))


def export_keras_file(path: str, export_dir: str = "saved_models", name: str | None = None,
                      version: int | None = None) -> ExportResult:
    """Export a ``.keras`` file written by a kode run (or any Keras model file): the
    ``kode.json`` beside it, when there is one, supplies the metadata (preprocessing, class
    names) and the default name; then as :func:`export_model`."""
    metadata = read_sidecar(path)
    model = load_keras_file(path)
    name = name or (metadata or {}).get("model") or model.name
    return export_model(model, export_dir, name=name, version=version, metadata=metadata)


def verify_export(path: str, model: keras.Model, inputs: np.ndarray) -> float:
    """Return max |SavedModel(inputs) - model(inputs, training=False)| over all outputs.

    ``inputs`` are preprocessed (what the Keras model takes); ``path`` is a SavedModel folder
    (or a model folder, whose latest version is used). The ``serving_preprocessed`` signature
    is called and its outputs compared with the Keras outputs put through the same head
    (softmax for logits).
    """
    sm_path = _resolve_savedmodel(path)
    meta = load_metadata(sm_path)
    loaded = _load_savedmodel(sm_path)
    inputs = _as_float_array(inputs, "inputs")
    head = meta.get("serving", {}).get("head")
    if head not in _HEADS:
        raise KodeError(f"{sm_path} was exported by an older kode (no serving head); re-export")
    try:
        expected = _head_outputs(model(tf.constant(inputs), training=False), head)
    except Exception as exc:
        raise KodeError(
            f"Keras model {model.name!r} failed on the inputs: {one_line(exc)}"
        ) from exc
    return _compare_outputs(loaded, sm_path, SIGNATURE_PREPROCESSED, inputs, expected)


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


def _check_atol(atol: Any) -> float:
    try:
        value = float(atol)
    except (TypeError, ValueError):
        raise KodeError(f"atol must be a number, got {atol!r}") from None
    if not np.isfinite(value) or value < 0:
        raise KodeError(f"atol must be a finite number >= 0, got {atol!r}")
    return value


def _as_float_array(x: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise KodeError(f"{what} must be a numeric array") from None
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise KodeError(f"{what} must be a non-empty batch, got shape {arr.shape}")
    return arr


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


def _check_batch_shape(shape: tuple, expected: list, what: str) -> None:
    ok = len(shape) == len(expected) + 1 and all(
        e is None or e == s for s, e in zip(shape[1:], expected, strict=True)
    )
    if not ok:
        raise KodeError(
            f"{what} has shape {tuple(shape)}, model expects (batch, "
            f"{', '.join('None' if d is None else str(d) for d in expected)})"
        )


def _jsonable_metadata(metadata: Any) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise KodeError(f"metadata must be a dict, got {type(metadata).__name__}")

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    try:
        return json.loads(json.dumps(metadata, default=default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise KodeError(f"metadata is not JSON-serializable: {one_line(exc)}") from exc


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


def _full_metadata(
    user: dict, model: keras.Model, name: str, input_shape: list, preprocessing: dict,
    serving: dict,
) -> dict:
    known = {"name": name, "model_name": model.name, "input_shape": input_shape}
    for key, value in known.items():
        if key in user and user[key] != value:
            raise KodeError(
                f"metadata {key}={user[key]!r} contradicts the export ({key}={value!r})"
            )
    meta = dict(user)
    meta.update(known)
    meta["preprocessing"] = preprocessing
    meta["serving"] = serving
    meta["keras_version"] = keras.__version__
    meta["tensorflow_version"] = tf.__version__
    if "classifier_activation" not in meta:
        activation = _infer_classifier_activation(model)
        if activation is not None:
            meta["classifier_activation"] = activation
    return meta


def _check_class_names(meta: dict, outputs: dict) -> None:
    names = meta.get("class_names")
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise KodeError("metadata class_names must be a list of strings")
    scores = outputs.get("probabilities", outputs.get("outputs"))
    n_outputs = None if scores is None or len(scores.shape) != 2 else int(scores.shape[-1])
    if n_outputs is not None and len(names) != n_outputs:
        raise KodeError(
            f"metadata has {len(names)} class_names but the model outputs {n_outputs} scores"
        )
