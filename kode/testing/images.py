"""Folders of small real images for tests of the image-folder datasets: scikit-learn's digits,
upsampled, written as PNG (and JPEG, BMP, GIF on request), some grey and some RGB."""

from __future__ import annotations

import os

import numpy as np

#: The class folders' names: digit k's images go to ``NAMES[k]``.
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_image_folder(root: str, *, classes: int = 3, per_class: int = 20, size: int = 12,
                       formats: tuple[str, ...] = ("png",), grey_every: int = 3,
                       start: int = 0) -> list[str]:
    """Write ``per_class`` images of each digit 0 … ``classes`` − 1 to ``root/NAMES[digit]/``:
    the digit (8x8, 0–16) upsampled bilinearly to ``size`` x ``size``; every ``grey_every``-th
    image saved grey, the others RGB (the digit in red and green, its negative in blue).
    File k of a class has the extension ``formats[k % len(formats)]``. Returns the paths
    written, relative to ``root``, sorted. ``start`` skips that many images of each digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    for label in range(classes):
        folder = os.path.join(root, NAMES[label])
        os.makedirs(folder, exist_ok=True)
        images = digits.images[digits.target == label][start:start + per_class]
        if len(images) < per_class:
            raise ValueError(f"digits has only {len(images)} images of {label} from {start}")
        for k, image in enumerate(images):
            grey = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), "L")
            grey = grey.resize((size, size), Image.Resampling.BILINEAR)
            if grey_every and k % grey_every == 0:
                picture = grey
            else:
                v = np.asarray(grey)
                picture = Image.fromarray(np.stack([v, v // 2, 255 - v], axis=-1), "RGB")
            name = os.path.join(NAMES[label], f"{k:03d}.{formats[k % len(formats)]}")
            picture.save(os.path.join(root, name))
            written.append(name)
    return sorted(written)
