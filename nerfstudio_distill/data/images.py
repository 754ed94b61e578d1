"""Read an image file as float RGB in [0, 1], whatever its bit depth.

PIL's ``convert("RGB")`` clips 16- and 32-bit grey images (modes ``I;16``, ``I``, ``F``) to 255, so a
16-bit PNG reads as saturated white. Here each mode is divided by its own full scale instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jaxtyping import Float
from PIL import Image

_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}
"""Full-scale value of PIL's integer grey modes above 8 bits (mode ``I`` is judged by its values)."""


def read_rgb(path: str | Path) -> Float[np.ndarray, "H W 3"]:
    """The image at ``path`` as float32 RGB in [0, 1] (alpha dropped, grey expanded to RGB).

    Raises PIL's ``UnidentifiedImageError`` / ``OSError`` for files that are not images.
    """
    with Image.open(path) as im:
        if im.mode in _FULL_SCALE or im.mode in ("I", "F"):
            grey = np.asarray(im, dtype=np.float32)
            if im.mode in _FULL_SCALE:
                scale = _FULL_SCALE[im.mode]
            elif im.mode == "I":  # 32-bit integer grey; PNG decoders put 16-bit data here too
                scale = 65535.0 if grey.max(initial=0) > 255 else 255.0
            else:  # float grey: assumed already in [0, 1]
                scale = 1.0
            grey = np.clip(grey / scale, 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
