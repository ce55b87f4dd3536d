"""Export Keras models as SavedModels in the TensorFlow Serving layout, and serve them locally.

Layout written by :func:`export_model`::

    <export_dir>/<name>/<version>/saved_model.pb
                                 /variables/...
                                 /assets/
                                 /assets.extra/kode.json     # metadata (see below)

``<version>`` is an integer folder, as TensorFlow Serving expects. A version is never
overwritten. It is written to a hidden temporary sibling folder (``<name>/.tmp-...``, which
Serving ignores because the name is not an integer), verified against the Keras model, and only
then renamed into place, so Serving never sees a half-written or unverified version.

The SavedModel comes from ``model.export(..., format="tf_saved_model")``: a forward-only
(inference) graph with two signatures, ``serve`` and ``serving_default``. The signature's input
key is the Keras input *layer name* (``"keras_tensor"`` for an unnamed ``keras.Input``,
``"args_0"`` for a subclassed model) and its output key is ``"output_0"``, whatever the output
layer is called; both keys are recorded in ``kode.json`` under ``"serving"``.

``kode.json`` holds whatever the caller passes as ``metadata`` (JSON-serializable; numpy scalars
and arrays are converted) plus what is known from the model: ``name`` (the export name),
``model_name``, ``input_shape`` (per example, without the batch axis), ``serving`` (signature
name, input key, output key), ``keras_version``, ``tensorflow_version`` and, unless given,
``classifier_activation`` (inferred from the last layer when it has an ``activation``).
Keys read back by :func:`predict_files`: ``class_names`` (list of str), ``mean`` and ``std``
(per channel, or one number, on the [0, 1] pixel scale) and ``classifier_activation``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError

__all__ = [
    "ExportResult",
    "Prediction",
    "export_model",
    "verify_export",
    "load_metadata",
    "predict_files",
]

SIGNATURE = "serving_default"
METADATA_DIR = "assets.extra"
METADATA_FILE = "kode.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TMP_PREFIX = ".tmp-export-"
_CHECK_BATCH = 4
_CHECK_SEED = 0
# Activations whose outputs are already probabilities (used as is by predict_files).
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ExportResult:
    """Outcome of :func:`export_model`."""

    path: str  # .../<name>/<version>
    version: int
    max_abs_diff: float  # SavedModel vs Keras model on the check batch


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
        metadata: extra JSON-serializable information (class names, mean/std, dataset, ...)
            stored in ``<version>/assets.extra/kode.json`` together with what is known from the
            model.
        check_inputs: batch used to compare the SavedModel with the Keras model. Default: a
            deterministic standard-normal float32 batch of 4 with the model's input shape.
        atol: largest accepted absolute difference between SavedModel and Keras outputs.

    Returns:
        An :class:`ExportResult` with the version folder path, the version and the difference.

    Raises:
        KodeError: bad arguments, an unwritable export folder, an existing version, or a
            SavedModel that does not reproduce the Keras model within ``atol`` (the exported
            folder is then kept, outside the Serving layout, for inspection).
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
    if check_inputs is not None:
        check_inputs = _as_float_array(check_inputs, "check_inputs")
        known = _model_input_shape(model)
        if known is not None:
            _check_batch_shape(check_inputs.shape, known, "check_inputs")
    elif (known := _model_input_shape(model)) is not None and None in known:
        raise KodeError(
            f"model input shape {_fmt_shape(known)} has unknown dimensions; pass check_inputs"
        )

    # Up front: the folder exists, is a folder, is writable, and the version is free.
    model_dir = _prepare_model_dir(export_dir, name)
    if version is not None:
        _refuse_existing(model_dir, version)
    tmp = _make_tmp_dir(model_dir, version)

    keep_tmp = False
    try:
        # Export into a fresh subfolder rather than into ``tmp`` itself: mkdtemp creates ``tmp``
        # with mode 0700, which a Serving process running as another user could not read.
        export_path = os.path.join(tmp, "model")
        try:
            model.export(export_path, format="tf_saved_model", verbose=False)
        except Exception as exc:  # Keras raises ValueError/TypeError/... for unexportable models
            raise KodeError(
                f"model {model.name!r} could not be exported: {_one_line(exc)}"
            ) from exc

        loaded = _load_savedmodel(export_path)
        input_key, input_spec, output_keys = _signature_info(loaded, export_path)
        input_shape = [None if d is None else int(d) for d in input_spec.shape[1:]]

        meta = _full_metadata(user_meta, model, name, input_shape, input_key, output_keys)
        _check_preprocessing_metadata(meta, input_shape, _output_width(loaded))
        _write_metadata(export_path, meta)

        if check_inputs is None:
            if None in input_shape:
                raise KodeError(
                    f"model input shape {_fmt_shape(input_shape)} has unknown dimensions; "
                    "pass check_inputs"
                )
            rng = np.random.default_rng(_CHECK_SEED)
            check_inputs = rng.standard_normal((_CHECK_BATCH, *input_shape)).astype(np.float32)
        diff = _compare(loaded, export_path, model, check_inputs)
        if not diff <= atol:  # also catches NaN
            keep_tmp = True
            raise KodeError(
                f"exported SavedModel differs from the Keras model by max |diff| = {diff:.3g} "
                f"> atol = {atol:g}; not published as a version, kept for inspection at "
                f"{export_path}"
            )

        _fsync_tree(tmp)
        final_version, final_path = _publish(export_path, model_dir, version)
    except BaseException:
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(path=final_path, version=final_version, max_abs_diff=float(diff))


def check_export_dir(export_dir: str, name: str) -> None:
    """Fail now, before a long training run, if ``export_dir/name`` cannot take a new version."""
    _check_name(name)
    model_dir = _prepare_model_dir(export_dir, name)
    os.rmdir(_make_tmp_dir(model_dir, None))


def verify_export(path: str, model: keras.Model, inputs: np.ndarray) -> float:
    """Return max |SavedModel(inputs) - model(inputs, training=False)| over all outputs.

    ``path`` is a SavedModel folder (or a model folder, whose latest version is used); the
    ``serving_default`` signature is called.
    """
    sm_path = _resolve_savedmodel(path)
    loaded = _load_savedmodel(sm_path)
    return _compare(loaded, sm_path, model, _as_float_array(inputs, "inputs"))


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
    count, resized (bilinear) to the model's H x W, scaled to [0, 1], normalized with the
    metadata ``mean``/``std`` and all files are sent through ``serving_default`` as one batch.
    Outputs are passed through a softmax unless the metadata ``classifier_activation`` says they
    are already probabilities (``softmax``/``sigmoid``); without that key, rows that are
    non-negative and sum to 1 are taken as probabilities.

    ``savedmodel_path`` is a version folder, or a model folder (its latest version is used).
    """
    if isinstance(files, (str, bytes, os.PathLike)):
        raise KodeError("files must be a list of paths, not a single path")
    files = [os.fspath(f) for f in files]
    sm_path = _resolve_savedmodel(savedmodel_path)
    meta = load_metadata(sm_path)
    loaded = _load_savedmodel(sm_path)
    input_key, spec, output_keys = _signature_info(loaded, sm_path)
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
    n_out = _output_width(loaded)
    mean, std = _check_preprocessing_metadata(meta, [height, width, channels], n_out)
    if not files:
        return []

    batch = np.stack([_load_image(f, height, width, channels) for f in files])
    batch = ((batch - mean) / std).astype(np.float32)
    try:
        out = loaded.signatures[SIGNATURE](**{input_key: tf.constant(batch)})[output_keys[0]]
    except Exception as exc:
        raise KodeError(f"{sm_path}: inference failed: {_one_line(exc)}") from exc
    scores = np.asarray(out, dtype=np.float64).reshape(len(files), -1)
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


def _model_input_shape(model: keras.Model) -> list[int | None] | None:
    """Per-example input shape of a single-input functional/Sequential model, else None."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    if len(inputs) != 1:
        raise KodeError(f"model {model.name!r} has {len(inputs)} inputs; only 1 is supported")
    return [None if d is None else int(d) for d in inputs[0].shape[1:]]


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
    user: dict,
    model: keras.Model,
    name: str,
    input_shape: list,
    input_key: str,
    output_keys: list[str],
) -> dict:
    known = {"name": name, "model_name": model.name, "input_shape": input_shape}
    for key, value in known.items():
        if key in user and user[key] != value:
            raise KodeError(
                f"metadata {key}={user[key]!r} contradicts the export ({key}={value!r})"
            )
    meta = dict(user)
    meta.update(known)
    meta["serving"] = {
        "signature": SIGNATURE,
        "input_key": input_key,
        "output_keys": output_keys,
    }
    meta["keras_version"] = keras.__version__
    meta["tensorflow_version"] = tf.__version__
    if "classifier_activation" not in meta:
        activation = _infer_classifier_activation(model)
        if activation is not None:
            meta["classifier_activation"] = activation
    return meta


def _check_preprocessing_metadata(
    meta: dict, input_shape: list, n_outputs: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate class_names/mean/std against the model; return (mean, std) as arrays."""
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise KodeError("metadata class_names must be a list of strings")
        if n_outputs is not None and len(names) != n_outputs:
            raise KodeError(
                f"metadata has {len(names)} class_names but the model outputs {n_outputs} scores"
            )
    channels = input_shape[-1] if input_shape else None
    out = []
    for key, fallback in (("mean", 0.0), ("std", 1.0)):
        value = meta.get(key, fallback)
        try:
            arr = np.asarray(value, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise KodeError(f"metadata {key} must be a number or a list of numbers") from None
        if arr.size not in (1, channels) or not np.all(np.isfinite(arr)):
            raise KodeError(
                f"metadata {key}={value!r} must be one finite number or one per channel "
                f"({channels})"
            )
        out.append(arr)
    if np.any(out[1] == 0):
        raise KodeError(f"metadata std={meta['std']!r} contains 0")
    return out[0], out[1]


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


def _make_tmp_dir(model_dir: str, version: int | None) -> str:
    prefix = f"{_TMP_PREFIX}{'next' if version is None else version}-"
    try:
        return tempfile.mkdtemp(prefix=prefix, dir=model_dir)
    except OSError as exc:
        raise KodeError(f"export directory {model_dir} is not writable: {_one_line(exc)}") from exc


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


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or new file in it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _signature_info(loaded: Any, path: str) -> tuple[str, tf.TensorSpec, list[str]]:
    """(input key, input spec, output keys in output order) of ``serving_default``."""
    signatures = getattr(loaded, "signatures", {})
    if SIGNATURE not in signatures:
        raise KodeError(f"{path} has no {SIGNATURE!r} signature (has {sorted(signatures)})")
    fn = signatures[SIGNATURE]
    _args, kwargs = fn.structured_input_signature
    if len(kwargs) != 1:
        raise KodeError(f"{path}: expected a single-input model, signature has {sorted(kwargs)}")
    ((input_key, spec),) = kwargs.items()
    outputs = fn.structured_outputs
    # Keras names the outputs output_0, output_1, ...: order them by index, not by string.
    output_keys = sorted(outputs, key=lambda k: (_key_index(k), k))
    return input_key, spec, output_keys


def _key_index(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _output_width(loaded: Any) -> int | None:
    fn = loaded.signatures[SIGNATURE]
    outputs = fn.structured_outputs
    if len(outputs) != 1:
        return None
    shape = next(iter(outputs.values())).shape
    return shape[-1] if shape.rank == 2 else None


def _compare(loaded: Any, path: str, model: keras.Model, inputs: np.ndarray) -> float:
    input_key, spec, output_keys = _signature_info(loaded, path)
    expected_shape = [None if d is None else int(d) for d in spec.shape[1:]]
    _check_batch_shape(inputs.shape, expected_shape, "check inputs")
    x = tf.constant(inputs, dtype=spec.dtype)
    try:
        served = loaded.signatures[SIGNATURE](**{input_key: x})
    except Exception as exc:
        raise KodeError(f"{path}: SavedModel inference failed: {_one_line(exc)}") from exc
    try:
        reference = model(x, training=False)
    except Exception as exc:
        raise KodeError(
            f"Keras model {model.name!r} failed on the inputs: {_one_line(exc)}"
        ) from exc
    reference = keras.tree.flatten(reference)
    if len(reference) != len(output_keys):
        raise KodeError(
            f"{path} has {len(output_keys)} outputs, the Keras model has {len(reference)}"
        )
    diffs = [0.0]
    for key, ref in zip(output_keys, reference, strict=True):
        a = np.asarray(served[key], dtype=np.float64)
        b = np.asarray(keras.ops.convert_to_numpy(ref), dtype=np.float64)
        if a.shape != b.shape:
            raise KodeError(f"{path}: output {key} has shape {a.shape}, Keras gives {b.shape}")
        if a.size:
            diffs.append(float(np.max(np.abs(a - b))))
    return float("nan") if any(np.isnan(diffs)) else max(diffs)


# ----------------------------------------------------------------------------------------------
# Helpers: images
# ----------------------------------------------------------------------------------------------


def _load_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """Read ``path`` as float32 (H, W, C) in [0, 1]; any failure names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
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
