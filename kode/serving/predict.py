"""Classify image files with an exported kode SavedModel (its ``serving_default`` signature:
raw pixels 0–255, preprocessing in the graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from kode.errors import KodeError, one_line
from kode.serving.publish import _load_savedmodel, _resolve_savedmodel, load_metadata
from kode.serving.signatures import _PROBABILITY_ACTIVATIONS, INPUT_KEY, SIGNATURE, _fmt_shape


@dataclass(frozen=True)
class Prediction:
    """Top-1 prediction for one image file."""

    file: str
    class_index: int
    class_name: str  # from metadata "class_names"; the index as a string if there are none
    probability: float


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
        raise KodeError(f"{sm_path}: inference failed: {one_line(exc)}") from exc
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


def _load_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """Read ``path`` as float32 (H, W, C), pixel values 0-255; any failure names the file.

    Channels are converted by :func:`kode.images.to_channels` (as the image-folder datasets
    convert them), then the image is resized with PIL's bilinear filter."""
    from PIL import Image, UnidentifiedImageError

    from kode.images import GREY_MODES, NATIVE_MODES, to_channels

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in NATIVE_MODES:  # palette, 1-bit, 16-bit, CMYK, …
                img = img.convert("L" if img.mode in GREY_MODES else "RGB")
            native = np.asarray(img, dtype=np.uint8)
            pixels = to_channels(native.reshape(*native.shape[:2], -1), channels).numpy()
            img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels,
                                  "L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise KodeError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise KodeError(f"not an image file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KodeError(f"cannot read image {path}: {one_line(exc)}") from exc
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
