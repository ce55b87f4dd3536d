"""Export Keras models as SavedModels in the TensorFlow Serving layout, and serve them locally.

Layout written by :func:`export_model`::

    <export_dir>/<name>/<version>/saved_model.pb
                                 /variables/...
                                 /assets.extra/kode.json     # metadata (see below)

``<version>`` is an integer folder, as TensorFlow Serving expects. A version is never
overwritten. It is written to a hidden temporary sibling folder (``<name>/.tmp-export-...``,
which Serving ignores because the name is not an integer), every file is fsync'ed, the result
is verified against the Keras model, and only then renamed into place, so Serving never sees a
half-written or unverified version. The exporting process holds an ``flock`` on
``.tmp-export-*/owner`` while it works; a temporary folder whose lock is free was left by a
killed export and is removed by the next export into the same model folder (never one in
flight). A SavedModel that fails verification is moved to ``<name>/.refused-*`` (not a
version) and the error names that folder.

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
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError
from kode.files import fsync_dir
from kode.preprocessing import IDENTITY, apply_preprocessing, check_preprocessing, mean_std

__all__ = [
    "ExportResult",
    "Prediction",
    "INPUT_KEY",
    "export_model",
    "verify_export",
    "load_metadata",
    "predict_files",
]

SIGNATURE = "serving_default"  # raw pixels, float32
SIGNATURE_UINT8 = "serving_uint8"  # raw pixels, uint8
SIGNATURE_PREPROCESSED = "serving_preprocessed"  # what the Keras model takes
INPUT_KEY = "images"
METADATA_DIR = "assets.extra"
METADATA_FILE = "kode.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TMP_PREFIX = ".tmp-export-"
_REFUSED_PREFIX = ".refused-"
_OWNER_FILE = "owner"
# A temporary folder without an owner lock (only an older kode writes those) is stale once
# nothing in it changed for this long.
_UNLOCKED_STALE_SECONDS = 3600.0
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


@dataclass(frozen=True)
class Prediction:
    """Top-1 prediction for one image file."""

    file: str
    class_index: int
    class_name: str  # from metadata "class_names"; the index as a string if there are none
    probability: float


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


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
            f"Keras model {model.name!r} failed on the check inputs: {_one_line(exc)}"
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


def check_export_dir(export_dir: str, name: str) -> None:
    """Fail now, before a long training run, if ``export_dir/name`` cannot take a new version."""
    _check_name(name)
    model_dir = _prepare_model_dir(export_dir, name)
    remove_stale_exports(model_dir)
    tmp, owner = _make_tmp_dir(model_dir, None)
    shutil.rmtree(tmp, ignore_errors=True)
    owner.close()


def remove_stale_exports(model_dir: str) -> list[str]:
    """Remove ``.tmp-export-*`` folders of ``model_dir`` left by killed exports; return them.

    A folder is stale when no process holds the ``flock`` on its ``owner`` file (the kernel
    releases it when the exporting process dies, however it dies); folders of exports in
    flight are never touched. A folder without an ``owner`` file is stale once nothing in it
    changed for an hour.
    """
    removed = []
    try:
        entries = sorted(os.listdir(model_dir))
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(model_dir, entry)
        if not entry.startswith(_TMP_PREFIX) or not os.path.isdir(path):
            continue
        try:
            fh = open(os.path.join(path, _OWNER_FILE), "rb")  # noqa: SIM115 (held for the lock)
        except FileNotFoundError:
            if time.time() - _newest_mtime(path) > _UNLOCKED_STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # an export in flight
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_dir(model_dir)
    return removed


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
            f"Keras model {model.name!r} failed on the inputs: {_one_line(exc)}"
        ) from exc
    return _compare_outputs(loaded, sm_path, SIGNATURE_PREPROCESSED, inputs, expected)


def load_metadata(path: str) -> dict:
    """Read ``assets.extra/kode.json`` of a SavedModel folder (or a model folder's latest)."""
    sm_path = _resolve_savedmodel(path)
    meta_path = os.path.join(sm_path, METADATA_DIR, METADATA_FILE)
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise KodeError(
            f"{sm_path} has no {METADATA_DIR}/{METADATA_FILE}: not a kode export"
        ) from None
    except (OSError, ValueError) as exc:
        raise KodeError(f"cannot read metadata {meta_path}: {_one_line(exc)}") from exc
    if not isinstance(meta, dict):
        raise KodeError(f"metadata {meta_path} is not a JSON object")
    return meta


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def predict_files(savedmodel_path: str, files: list[str]) -> list[Prediction]:
    """Classify image files with an exported model; returns the top-1 class per file.

    Each file is opened with PIL, converted to grayscale or RGB to match the model's channel
    count, resized (bilinear) to the model's H x W and sent, as pixel values 0-255, through
    ``serving_default`` (which preprocesses in the graph) in one batch. A model with the
    ``"outputs"`` head (not a classifier) gets a softmax over its outputs unless the metadata
    ``classifier_activation`` says they are probabilities.

    ``savedmodel_path`` is a version folder, or a model folder (its latest version is used).
    """
    if isinstance(files, (str, bytes, os.PathLike)):
        raise KodeError("files must be a list of paths, not a single path")
    files = [os.fspath(f) for f in files]
    sm_path = _resolve_savedmodel(savedmodel_path)
    meta = load_metadata(sm_path)
    loaded = _load_savedmodel(sm_path)
    signatures = getattr(loaded, "signatures", {})
    if SIGNATURE not in signatures or meta.get("serving", {}).get("input_key") != INPUT_KEY:
        raise KodeError(
            f"{sm_path} was exported by an older kode (its {SIGNATURE!r} signature does not "
            "take raw pixels); re-export it with `kode export MODEL.keras`"
        )
    fn = signatures[SIGNATURE]
    spec = fn.structured_input_signature[1][INPUT_KEY]
    if spec.shape.rank != 4:
        raise KodeError(f"{sm_path} does not take images (input shape {_fmt_shape(spec.shape)})")
    height, width, channels = spec.shape[1:]
    if height is None or width is None:  # fully convolutional: fall back to the metadata size
        shape = meta.get("input_shape") or [None, None]
        height, width = height or shape[0], width or shape[1]
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise KodeError(f"{sm_path}: unknown input height/width, set input_shape in metadata")
    if channels not in (1, 3):
        raise KodeError(f"{sm_path}: images need 1 or 3 input channels, model has {channels}")
    if not files:
        return []

    batch = np.stack([_load_image(f, height, width, channels) for f in files])
    try:
        out = fn(**{INPUT_KEY: tf.constant(batch, tf.float32)})
    except Exception as exc:
        raise KodeError(f"{sm_path}: inference failed: {_one_line(exc)}") from exc
    if "probabilities" in out:
        probs = np.asarray(out["probabilities"], dtype=np.float64)
    else:
        scores = np.asarray(out["outputs"], dtype=np.float64).reshape(len(files), -1)
        probs = scores if _are_probabilities(scores, meta) else _softmax(scores)

    names = meta.get("class_names")
    preds = []
    for f, row in zip(files, probs, strict=True):
        idx = int(np.argmax(row))
        label = str(names[idx]) if names else str(idx)
        preds.append(
            Prediction(file=f, class_index=idx, class_name=label, probability=float(row[idx]))
        )
    return preds


# ----------------------------------------------------------------------------------------------
# Serving graph
# ----------------------------------------------------------------------------------------------

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
        raise KodeError(f"model {model.name!r} could not be exported: {_one_line(exc)}") from exc


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
        raise KodeError(f"{path}: SavedModel inference failed: {_one_line(exc)}") from exc
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


# ----------------------------------------------------------------------------------------------
# Helpers: arguments
# ----------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _fmt_shape(shape: Any) -> str:
    dims = list(shape) if not isinstance(shape, tf.TensorShape) else shape.as_list()
    return "(" + ", ".join("None" if d is None else str(d) for d in dims) + ")"


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KodeError(
            f"invalid export name {name!r}: use letters, digits, '.', '_' or '-' "
            "(not starting with '.'); pass name=..."
        )


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise KodeError(f"version must be a non-negative integer, got {version!r}")


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
    from keras.src.export.export_utils import get_input_signature

    try:
        signature = get_input_signature(model)
    except (TypeError, ValueError) as exc:
        raise KodeError(f"model {model.name!r} cannot be exported: {_one_line(exc)}") from exc
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
        raise KodeError(f"metadata is not JSON-serializable: {_one_line(exc)}") from exc


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


# ----------------------------------------------------------------------------------------------
# Helpers: file system
# ----------------------------------------------------------------------------------------------


def _prepare_model_dir(export_dir: str, name: str) -> str:
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir):
        raise KodeError(f"invalid export directory {export_dir!r}")
    model_dir = os.path.join(os.path.abspath(os.fspath(export_dir)), name)
    for path in (os.path.dirname(model_dir), model_dir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise KodeError(f"cannot export to {path}: a file is in the way (not a directory)")
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as exc:
        raise KodeError(f"cannot create export directory {model_dir}: {_one_line(exc)}") from exc
    return model_dir


def _make_tmp_dir(model_dir: str, version: int | None) -> tuple[str, Any]:
    """A new ``.tmp-export-*`` folder and its open, flock'ed ``owner`` file (close to unlock)."""
    prefix = f"{_TMP_PREFIX}{'next' if version is None else version}-"
    try:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=model_dir)
    except OSError as exc:
        raise KodeError(f"export directory {model_dir} is not writable: {_one_line(exc)}") from exc
    try:
        owner = open(os.path.join(tmp, _OWNER_FILE), "w", encoding="utf-8")  # noqa: SIM115
        fcntl.flock(owner.fileno(), fcntl.LOCK_EX)
        owner.write(f"pid {os.getpid()}\n")
        owner.flush()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KodeError(f"export directory {model_dir} is not writable: {_one_line(exc)}") from exc
    return tmp, owner


def _keep_refused(export_path: str, model_dir: str, tmp: str) -> str:
    """Move a SavedModel that failed verification to ``model_dir/.refused-*``; say where."""
    dest = os.path.join(model_dir, _REFUSED_PREFIX + os.path.basename(tmp)[len(_TMP_PREFIX):])
    try:
        os.rename(export_path, dest)
    except OSError as exc:
        return f"nowhere: it could not be moved out of the temporary folder ({_one_line(exc)})"
    fsync_dir(model_dir)
    return dest


def _newest_mtime(root: str) -> float:
    newest = 0.0
    for dirpath, _dirs, filenames in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            try:
                newest = max(newest, os.lstat(p).st_mtime)
            except OSError:
                pass
    return newest


def _existing_versions(model_dir: str) -> list[int]:
    try:
        entries = os.listdir(model_dir)
    except OSError as exc:
        raise KodeError(f"cannot list {model_dir}: {_one_line(exc)}") from exc
    return [int(e) for e in entries if e.isdigit() and e.isascii()]


def _refuse_existing(model_dir: str, version: int) -> None:
    if int(version) in _existing_versions(model_dir):
        raise KodeError(
            f"version {version} already exists; refusing to overwrite "
            f"{os.path.join(model_dir, str(version))} (omit version to use the next free one)"
        )


def _publish(src: str, model_dir: str, version: int | None) -> tuple[int, str]:
    """Rename ``src`` to ``model_dir/<version>``; with version=None retry on a lost race."""
    for _ in range(100):
        if version is None:
            chosen = max(_existing_versions(model_dir), default=0) + 1
        else:
            chosen = int(version)
            _refuse_existing(model_dir, chosen)
        dest = os.path.join(model_dir, str(chosen))
        if os.path.lexists(dest):  # created meanwhile by a concurrent export
            if version is not None:
                _refuse_existing(model_dir, chosen)
            continue
        try:
            # On POSIX a directory rename onto an existing non-empty directory fails, so a
            # concurrent export that took the same number is never overwritten.
            os.rename(src, dest)
        except OSError as exc:
            if os.path.lexists(dest):
                if version is None:
                    continue
                raise KodeError(
                    f"version {chosen} already exists; refusing to overwrite {dest}"
                ) from exc
            raise KodeError(f"cannot move export into {dest}: {_one_line(exc)}") from exc
        fsync_dir(model_dir)
        return chosen, dest
    raise KodeError(f"could not find a free version number in {model_dir}")


def _write_metadata(savedmodel_dir: str, meta: dict) -> None:
    extra = os.path.join(savedmodel_dir, METADATA_DIR)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(root: str) -> None:
    """Flush every file and folder below ``root`` so a crash cannot publish partial data."""
    for dirpath, _dirs, filenames in os.walk(root):
        for fname in filenames:
            try:
                with open(os.path.join(dirpath, fname), "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
        fsync_dir(dirpath)


def _is_savedmodel(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")
    )


def _resolve_savedmodel(path: Any) -> str:
    """A SavedModel folder as given, or the latest integer version inside a model folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise KodeError(f"expected a SavedModel path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise KodeError(f"{path} is not a SavedModel directory (no such directory)")
    if _is_savedmodel(path):
        return path
    versions = sorted(
        (v for v in _existing_versions(path) if _is_savedmodel(os.path.join(path, str(v)))),
        reverse=True,
    )
    if versions:
        return os.path.join(path, str(versions[0]))
    raise KodeError(f"{path} is not a SavedModel directory (no saved_model.pb)")


# ----------------------------------------------------------------------------------------------
# Helpers: SavedModel
# ----------------------------------------------------------------------------------------------


def _load_savedmodel(path: str) -> Any:
    try:
        return tf.saved_model.load(path)
    except Exception as exc:  # TF raises OSError, ValueError, DecodeError, ...
        raise KodeError(f"cannot load SavedModel {path}: {_one_line(exc)}") from exc


# ----------------------------------------------------------------------------------------------
# Helpers: images
# ----------------------------------------------------------------------------------------------


def _load_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """Read ``path`` as float32 (H, W, C), pixel values 0-255; any failure names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise KodeError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise KodeError(f"not an image file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KodeError(f"cannot read image {path}: {_one_line(exc)}") from exc
    return arr.reshape(height, width, channels)


def _are_probabilities(scores: np.ndarray, meta: dict) -> bool:
    activation = meta.get("classifier_activation")
    if isinstance(activation, str):
        if activation.lower() in _PROBABILITY_ACTIVATIONS:
            return True
        if activation.lower() in ("linear", "none", "logits"):
            return False
    return bool(
        scores.size and np.all(scores >= 0) and np.allclose(scores.sum(axis=-1), 1.0, atol=1e-3)
    )


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
