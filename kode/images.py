"""One channel conversion for every image kode reads: ``kode predict`` (files opened with PIL)
and the image-folder pipelines (files decoded by ``tf.io.decode_image``) both bring grey,
grey+alpha, RGB and RGBA pixels to the model's 1 or 3 channels with :func:`to_channels`, so a
model trained on a folder sees at training time what it sees in ``kode predict``.

The rules are Pillow's ``Image.convert("L" | "RGB")``, bit for bit on uint8 pixels:

- alpha is dropped (not composited): RGBA → RGB, grey+alpha → grey;
- grey → RGB repeats the grey value in the three channels;
- RGB → grey is ITU-R 601-2 luma in Pillow's fixed point,
  ``L = (19595·R + 38470·G + 7471·B + 32768) >> 16``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

#: Pillow modes of grey images (with or without alpha, any bit depth).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})

#: Pillow modes :func:`to_channels` takes as they are (uint8, 1 to 4 channels).
NATIVE_MODES = ("L", "LA", "RGB", "RGBA")

#: Pillow's fixed-point luma weights (sum 65536) and rounding term.
_LUMA = (19595, 38470, 7471)
_LUMA_ROUND = 1 << 15


def to_channels(image: tf.Tensor | np.ndarray, channels: int) -> tf.Tensor:
    """``image`` (uint8, (..., H, W, C) with C in 1..4) with ``channels`` (1 or 3) channels,
    uint8, converted as Pillow converts to "L" or "RGB" (see the module docstring)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = tf.convert_to_tensor(image)
    native = image.shape[-1]
    if native is None:
        # Decoded images of unknown channels (tf.io.decode_image in a tf.data map): branch on
        # the runtime value; every branch gives the same static shape.
        c = tf.shape(image)[-1]
        return tf.switch_case(c - 1, [lambda n=n: _convert(image[..., :n], n, channels)
                                      for n in (1, 2, 3, 4)])
    return _convert(image, native, channels)


def _convert(image: tf.Tensor, native: int, channels: int) -> tf.Tensor:
    colour = image[..., :3] if native >= 3 else image[..., :1]  # drop the alpha
    if native < 3:
        return colour if channels == 1 else tf.repeat(colour, 3, axis=-1)
    if channels == 3:
        return colour
    weighted = tf.cast(colour, tf.int32) * tf.constant(_LUMA, tf.int32)
    luma = (tf.reduce_sum(weighted, axis=-1, keepdims=True) + _LUMA_ROUND) // (1 << 16)
    return tf.cast(luma, tf.uint8)
