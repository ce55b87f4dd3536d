"""Export a Keras model as a verified SavedModel with kode's serving signatures
(:mod:`kode.serving.signatures`), published as a new version (:mod:`kode.serving.publish`).

``kode.json`` holds whatever the caller passes as ``metadata`` (JSON-serializable; numpy
scalars and arrays are converted) plus what is known from the model: ``name`` (the export
name), ``model_name``, ``input_shape`` (per example, without the batch axis),
``preprocessing``, ``serving``, ``keras_version``, ``tensorflow_version`` and, unless given,
``classifier_activation`` (inferred from the last layer when it has an ``activation``).
:func:`~kode.serving.predict.predict_files` also reads ``class_names`` (list of str).
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

from kode.compat import all_layers
from kode.errors import KodeError, one_line
from kode.io import fsync_tree, load_keras_file, read_sidecar
from kode.serving.preprocessing import apply_preprocessing
from kode.serving.publish import (
    _check_name,
    _check_version,
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
from kode.serving.signatures import (
    _CHECK_SEED,
    _HEADS,
    _PIXEL_MAX,
    SIGNATURE,
    SIGNATURE_PREPROCESSED,
    SIGNATURE_UINT8,
    _compare_outputs,
    _fmt_shape,
    _head_kind,
    _head_outputs,
    _infer_classifier_activation,
    _model_input_spec,
    _preprocessing_from_metadata,
    _raw_check_inputs,
    _raw_signatures,
    _serving_description,
    _write_savedmodel,
)

__all__ = ["ExportResult", "export_keras_file", "export_model", "verify_export"]


_CHECK_BATCH = 4




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
    atol: float | None = None,
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
        atol: largest accepted absolute difference between SavedModel and Keras outputs;
            default :func:`default_atol` (1e-5, or a few rounding steps of a mixed-precision
            model's bfloat16/float16 outputs).

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
    atol = _check_atol(default_atol(model) if atol is None else atol)
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
    _check_finite(model, expected)
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
        fsync_tree(tmp)

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


def _check_finite(model: keras.Model, expected: dict) -> None:
    """A model whose own outputs on the check inputs are not finite cannot be verified (its
    SavedModel would "differ by nan"): refused before anything is written."""
    values = [np.asarray(v) for outputs in expected.values() for v in tf.nest.flatten(outputs)]
    bad = sum(int(np.size(v) - np.isfinite(v).sum()) for v in values)
    if bad:
        total = sum(int(np.size(v)) for v in values)
        raise KodeError(
            f"Keras model {model.name!r} gives non-finite outputs on the check inputs ({bad} of "
            f"{total} values): it cannot be verified, nothing was exported; check its weights "
            "(did training diverge?)")


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


#: rounding step (machine epsilon) of the low-precision compute dtypes.
_EPSILON = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def default_atol(model: keras.Model) -> float:
    """The verification's tolerance: 1e-5 for a model computing in float32; under mixed
    precision four rounding steps of its narrowest compute dtype (bfloat16: 0.016, float16:
    0.002), since the SavedModel's graph may fuse and order the low-precision kernels
    differently from Keras' eager calls (measured: 1e-3 for a ported ResNet50V2 under
    mixed_bfloat16). A wrong export (weights, preprocessing) differs by far more."""
    dtypes = {getattr(layer, "compute_dtype", None) for layer in all_layers(model)}
    return max([4 * _EPSILON[d] for d in dtypes if d in _EPSILON], default=1e-5)


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
