"""Scratch buffers the drivers reuse across calls.

On the CPU a fresh multi-megabyte column buffer costs more in page faults (the kernel zeroes
every new page on first touch) than the im2col that fills it, so NumPy scratch buffers are
kept per thread and reused; concurrent calls from different threads never share one. CuPy's
memory pool already reuses device blocks, so CuPy buffers are plain ``empty`` arrays. Every
element of a scratch buffer is written by a kernel before it is read.
"""

from __future__ import annotations

import threading

import numpy as np

#: NumPy scratch buffers up to this size (bytes, per buffer) are kept for reuse.
CACHED_WORKSPACE_BYTES = 128 * 2**20

_local = threading.local()


def scratch(xp, slot: str, shape: tuple, dtype) -> object:
    """An uninitialised ``shape`` / ``dtype`` array; for NumPy, a view of a cached buffer.

    ``slot`` names the buffer within one call (e.g. ``"columns"``): two live buffers of one call
    must have different slots.
    """
    dtype = np.dtype(dtype)
    size = 1
    for s in shape:
        size *= int(s)
    if xp is not np or size * dtype.itemsize > CACHED_WORKSPACE_BYTES:
        return xp.empty(shape, dtype=dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size:
        buffer = buffers[key] = np.empty(size, dtype=dtype)
    return buffer[:size].reshape(shape)
