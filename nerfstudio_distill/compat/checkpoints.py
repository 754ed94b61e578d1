"""Load nerfstudio 1.1.5 checkpoints under torch ≥ 2.6 without disabling ``weights_only``.

torch 2.6 made ``torch.load(weights_only=True)`` the default. nerfstudio 1.1.5 saves
numpy scalars in its checkpoints (nerfstudio #3683, fixed upstream but not released),
so ``--load-dir``, ``ns-export``, ``ns-viewer`` and ``ns-eval`` fail with
"Unsupported global: numpy.core.multiarray.scalar".

The fix allow-lists exactly what those numpy scalars pickle to: numpy's scalar
reconstructor, ``numpy.dtype``, and the concrete dtype classes of the scalar types
(numpy ≥ 1.25 names them ``numpy.dtypes.Float64DType`` and so on). Anything else
(``os.system``, object arrays, arbitrary classes) stays refused.
"""

from __future__ import annotations

import numpy as np
import torch

_SCALAR_CODES = "f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1".split()


def _scalar_reconstructors() -> list:
    """numpy's scalar reconstructor, under the name(s) a checkpoint may pickle it by."""
    if np.lib.NumpyVersion(np.__version__) < "2.0.0":
        return [np.core.multiarray.scalar]
    from numpy._core.multiarray import scalar  # numpy 2 renamed numpy.core to numpy._core

    # Checkpoints written under numpy 1.x still say numpy.core.multiarray.scalar.
    return [scalar, (scalar, "numpy.core.multiarray.scalar")]


def allowed_globals() -> list:
    """The globals a nerfstudio 1.1.5 checkpoint needs beyond torch's defaults."""
    dtype_classes = {type(np.dtype(code)) for code in _SCALAR_CODES} - {np.dtype}
    return [*_scalar_reconstructors(), np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def install() -> None:
    """Register :func:`allowed_globals` with torch's weights-only unpickler."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no weights-only default to fix
        add_safe_globals(allowed_globals())
