"""Arrays on the CPU (numpy) or on an NVIDIA GPU (CuPy), behind one namespace.

The per-row arithmetic of the families is written against ``xp``, the
array module of the chunk: numpy for numpy chunks, CuPy for CuPy chunks.
Parameters and statistics are small and always live on the host as numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEVICES = ("cpu", "cuda")


def array_module(x: Any) -> Any:
    """``cupy`` for a CuPy array, else ``numpy``."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def all_finite(x: Any) -> bool:
    """Whether every value of ``x`` is finite, without an element-wise copy when they are.

    NaN and inf survive a sum (inf - inf is NaN), so a finite sum proves
    every value finite; only a sum that is not (or that overflows) is
    followed by the element-wise test.
    """
    xp = array_module(x)
    with np.errstate(over="ignore", invalid="ignore"):
        if bool(xp.isfinite(x.sum(dtype=np.float64))):
            return True
    return bool(xp.isfinite(x).all())


def check_finite(x: Any, offset: int = 0) -> None:
    """Refuse NaN and inf in a chunk whose first row is global row ``offset``, naming the count and the rows."""
    if all_finite(x):
        return
    bad = to_numpy(~array_module(x).isfinite(x))
    rows = np.flatnonzero(bad.any(axis=1))
    raise ValueError(
        f"X contains {int(bad.sum())} non-finite values (NaN or inf) in rows "
        f"{offset + int(rows[0])} to {offset + int(rows[-1])}; remove or impute them"
    )


def to_numpy(x: Any) -> np.ndarray:
    """A host copy of ``x`` (no copy for numpy input)."""
    return x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)


def to_device(x: Any, device: str) -> Any:
    """Move a chunk to ``device`` ("cpu" leaves it where it is)."""
    if device == "cuda":
        try:
            import cupy
        except ImportError:
            raise ValueError("device='cuda' needs CuPy: pip install 'streamem[gpu]'") from None
        return cupy.asarray(x)
    return x


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except ImportError:
            raise ValueError("device='cuda' needs CuPy: pip install 'streamem[gpu]'") from None
        except Exception as exc:  # CuPy installed but no usable GPU
            raise ValueError(f"device='cuda' but no CUDA device is usable: {exc}") from None
