"""The two Numba targets: how a shared function is compiled, and how a kernel is launched.

Op modules write their per-item arithmetic once as plain Python and build their kernels from a
:class:`Target` (:func:`cpu_target`, :func:`cuda_target`) whose ``device`` compiles a helper for
that target, whose ``atomic_add`` scatters into an array (a plain add on the CPU, where kernels
are written so that no two threads share an element) and whose ``real`` is the arithmetic type:
float constants and integer-to-float conversions are written ``real(...)``. CUDA kernels are
built per accumulation dtype, so that a float32 kernel does no float64 arithmetic (float64 runs
at 1/32 to 1/64 of the float32 rate on most GPUs); the CPU kernels compute in float64 (Python
floats) whatever the storage type.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import numpy as np

from ..compile_notice import watch_numba_cpu_compiles, watching_numba_cuda_launch
from . import bilinear
from .disk_cache import cache_on_disk

THREADS_PER_BLOCK = 256
# Enough blocks to fill any current GPU several times over; the kernels' grid-stride loops
# cover the rest.
MAX_BLOCKS = 65536


class Target(NamedTuple):
    name: str
    real: type  # the arithmetic type: np.float32 or np.float64
    device: Callable  # compiles a plain Python function for this target
    atomic_add: Callable  # atomic_add(array1d, index, value)
    zero_padded_setup: Callable
    bilinear_weights: Callable
    zero_padded_corners: Callable
    zero_padded_run: Callable
    bilinear_combine: Callable
    bilinear_gradient: Callable
    border_clamped_setup: Callable
    border_clamped_corners: Callable


_HELPERS = (
    "zero_padded_setup",
    "bilinear_weights",
    "zero_padded_corners",
    "zero_padded_run",
    "bilinear_combine",
    "bilinear_gradient",
    "border_clamped_setup",
    "border_clamped_corners",
)


def _compiled_helpers(device, real):
    helpers = bilinear.functions(real)
    return {name: device(helpers[name]) for name in _HELPERS}


def _prefer_passive_openmp_waits():
    """Ask OpenMP worker threads to sleep, not spin, between parallel regions.

    Numba's OpenMP threading layer otherwise keeps its workers spinning after each ``prange``
    loop, which starves the BLAS threads of the GEMM that follows (and any other pool): on the
    2-core CPU shape of docs/benchmarks.md the forward took 102 ms with spinning workers and 24 ms without.
    libgomp reads the variable when it loads, at the first parallel launch, so it is set just
    before the first CPU kernel is built; a value the user chose is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@functools.lru_cache(maxsize=None)
def cpu_target() -> Target:
    _prefer_passive_openmp_waits()
    watch_numba_cpu_compiles()
    import numba

    def device(fn):
        return numba.njit(nogil=True, error_model="numpy", inline="always")(fn)

    @device
    def add(array, index, value):
        array[index] += value

    return Target("cpu", np.float64, device, add, **_compiled_helpers(device, np.float64))


# numba.cuda, bound as a module global on first CUDA use: importing it costs ~0.6 s that the CPU
# path never pays, and kernels must see it as a global (the CUDA simulator swaps a function's
# global ``cuda`` for its own, not a closure variable).
cuda = None


def bind_cuda():
    """Import numba.cuda once and bind it as this module's global ``cuda``; return it."""
    global cuda
    if cuda is None:
        from ..numba_cuda import cuda as module

        cuda = module
    return cuda


@functools.lru_cache(maxsize=None)
def cuda_target(dtype) -> Target:
    """The CUDA target computing in ``dtype`` (float32 or float64, a NumPy dtype)."""
    bind_cuda()

    def device(fn):
        return cuda.jit(device=True)(fn)

    @device
    def add(array, index, value):
        cuda.atomic.add(array, index, value)

    real = np.dtype(dtype).type
    return Target("cuda", real, device, add, **_compiled_helpers(device, real))


def cpu_kernel(fn, fastmath=False):
    """Compile a CPU kernel whose outer loop is a ``numba.prange``, cached on disk."""
    import numba

    return cache_on_disk(
        numba.njit(parallel=True, nogil=True, error_model="numpy", fastmath=fastmath, cache=True)(fn)
    )


def cpu_kernel_fast_sums(fn):
    """A :func:`cpu_kernel` whose floating-point sums may be reordered and fused into FMAs, so
    that its dot products vectorise (``reassoc`` and ``contract`` only: no assumption that
    values are finite, so NaN and infinity propagate as IEEE arithmetic says)."""
    # A dict, not a set: its repr (part of the disk-cache key) has a fixed order.
    return cpu_kernel(fn, fastmath={"contract": True, "reassoc": True})


def cuda_kernel(fn):
    """Compile a CUDA kernel, cached on disk (not under the simulator, which compiles nothing)."""
    from ..numba_cuda import simulator_enabled

    if simulator_enabled():
        return bind_cuda().jit(fn)
    return cache_on_disk(bind_cuda().jit(cache=True)(fn))


def typed_floats(values, dtype) -> tuple:
    """``values`` (a param record, scalars) with every Python float as a scalar of ``dtype``:
    the float arguments of a CUDA kernel built for that arithmetic type (a Python float
    argument is a float64)."""
    return tuple(np.dtype(dtype).type(v) if isinstance(v, float) else v for v in values)


def flat(array):
    """A 1-d view of a C-contiguous array: the kernels index flat."""
    return array.reshape(-1)


def launch_cuda(kernel, n_items: int, xp, *args) -> None:
    """Launch a grid-stride CUDA kernel over ``n_items`` on CuPy's current device and stream.

    Numba keeps a current device of its own (device 0 unless changed), so the launch, and the
    wrapping of CuPy's stream, happen in Numba's context of CuPy's current device: the device of
    the op's arrays, which ``pydeform._interop.dlpack_entry`` makes current. With ``xp`` NumPy (the CUDA simulator, host arrays) it launches without a stream and with
    small blocks, since the simulator runs every thread as a Python thread.
    """
    if n_items == 0:
        return
    if xp is np:
        threads = 32
        kernel[min(-(-n_items // threads), 4), threads](*args)
        return
    blocks = min(-(-n_items // THREADS_PER_BLOCK), MAX_BLOCKS)
    numba_cuda = bind_cuda()
    with numba_cuda.gpus[xp.cuda.Device().id]:
        stream = numba_cuda.external_stream(xp.cuda.get_current_stream().ptr)
        with watching_numba_cuda_launch(kernel):
            kernel[blocks, THREADS_PER_BLOCK, stream](*args)
