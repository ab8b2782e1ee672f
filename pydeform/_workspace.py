"""Scratch buffers the drivers reuse across calls, and buffers a caller provides instead.

On the CPU a fresh multi-megabyte column buffer costs more in page faults (the kernel zeroes
every new page on first touch) than the im2col that fills it, so NumPy scratch buffers are
kept per thread and reused; concurrent calls from different threads never share one. CuPy's
memory pool already reuses device blocks, so CuPy buffers are plain ``empty`` arrays. Every
element of a scratch buffer is written by a kernel before it is read.

A caller that owns the memory (:mod:`pydeform.jax`: XLA's buffers) runs a driver inside
:func:`provided`; every :func:`scratch` and :func:`output` request is then served from its
buffers, which it sized with the op's workspace plan (``deform_conv2d_workspace``,
``roi_workspace``, ``centernet_workspace``: ``{slot: (shape, dtype)}``, the plan the driver
itself requests from).
Results accumulated in float32 for half types go through :func:`accumulator` / :func:`finish`.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ._arrays import accumulation_dtype, thread_setting

#: NumPy scratch buffers up to this size (bytes, per buffer) are kept for reuse.
CACHED_WORKSPACE_BYTES = 128 * 2**20

_local = threading.local()


def scratch(xp, slot: str, shape: tuple, dtype) -> object:
    """An uninitialised ``shape`` / ``dtype`` array; for NumPy, a view of a cached buffer.

    ``slot`` names the buffer within one call (e.g. ``"columns"``): two live buffers of one call
    must have different slots. Inside a :func:`provided` block the buffer is the provided one.
    """
    dtype = np.dtype(dtype)
    arena = getattr(_local, "arena", None)
    if arena is not None:
        return _take(arena, slot, shape, dtype, exact=False)
    size = math.prod(int(s) for s in shape)
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


# Caller-provided buffers (the JAX integration hands XLA's output buffers to the drivers so that
# nothing is allocated behind XLA's back). While a ``provided`` block is active on this thread,
# every ``scratch`` and ``output`` request is served from it, and a request for a slot the
# caller did not plan is an error rather than a silent allocation.


def provided(buffers: dict):
    """Serve this thread's ``scratch`` / ``output`` requests from ``buffers`` within the block.

    ``buffers`` maps slot names to C-contiguous arrays: an output slot's array has exactly the
    output's size and dtype, a scratch slot's at least the requested size.
    """
    return thread_setting(_local, "arena", buffers)


def _take(arena: dict, slot: str, shape: tuple, dtype, *, exact: bool):
    size = math.prod(int(s) for s in shape)
    buffer = arena.get(slot)
    if buffer is None:
        raise RuntimeError(f"workspace: no buffer provided for slot {slot!r} ({shape}, {np.dtype(dtype).name})")
    if np.dtype(buffer.dtype) != np.dtype(dtype) or buffer.size < size or (exact and buffer.size != size):
        raise RuntimeError(
            f"workspace: slot {slot!r} needs {size} elements of {np.dtype(dtype).name}, "
            f"got {buffer.size} of {np.dtype(buffer.dtype).name}"
        )
    return buffer.reshape(-1)[:size].reshape(shape)


def output(xp, slot: str, shape: tuple, dtype, *, zero: bool = False):
    """The array a driver returns as ``slot``: new, or the provided one (zero-filled if asked)."""
    arena = getattr(_local, "arena", None)
    if arena is None:
        return (xp.zeros if zero else xp.empty)(shape, dtype=dtype)
    array = _take(arena, slot, shape, dtype, exact=True)
    if zero:
        array.fill(0)
    return array


def accumulator_slot(slot: str) -> str:
    """The scratch slot of output ``slot``'s accumulation buffer (half types only)."""
    return slot + ":acc"


def accumulator_plans(shapes: dict, dtype) -> dict:
    """The scratch slots, for arrays of storage type ``dtype``, of the accumulators or
    :func:`converted` copies named by ``shapes`` (``{slot: shape}``): ``{name: (shape, dtype)}``,
    empty unless ``dtype`` is a half type."""
    acc = accumulation_dtype(dtype)
    if acc == np.dtype(dtype):
        return {}
    return {accumulator_slot(slot): (tuple(shape), acc) for slot, shape in shapes.items()}


def accumulator(xp, slot: str, shape: tuple, dtype):
    """A zero-filled array in the accumulation dtype of ``dtype`` for output ``slot``: the output
    itself when the two dtypes agree, else a scratch buffer that :func:`finish` casts."""
    acc = accumulation_dtype(dtype)
    if acc == np.dtype(dtype):
        return output(xp, slot, shape, dtype, zero=True)
    array = scratch(xp, accumulator_slot(slot), shape, acc)
    array.fill(0)
    return array


def converted(xp, slot: str, array):
    """``array`` in its accumulation dtype: itself (None stays None), or a copy in scratch slot
    ``accumulator_slot(slot)`` (planned by :func:`accumulator_plans`)."""
    if array is None:
        return None
    acc = accumulation_dtype(array.dtype)
    if acc == np.dtype(array.dtype):
        return array
    copy = scratch(xp, accumulator_slot(slot), array.shape, acc)
    copy[...] = array
    return copy


def converted_arrays(xp, arrays: dict) -> list:
    """:func:`converted` of each array of ``{slot: array or None}``, in order."""
    return [converted(xp, slot, array) for slot, array in arrays.items()]


def finish(xp, slot: str, accumulated, dtype):
    """Output ``slot`` holding ``accumulated`` (from :func:`accumulator`) in ``dtype``."""
    if np.dtype(accumulated.dtype) == np.dtype(dtype):
        return accumulated
    array = output(xp, slot, accumulated.shape, dtype)
    array[...] = accumulated
    return array
