"""Kernel sets: the per-backend kernels behind each op's shared driver.

A kernel set has an ``xp`` attribute (the array library: ``numpy`` or ``cupy``) and one method
per kernel of an op. Backends are imported only when an op first needs them, so
``import pydeform`` compiles nothing and needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def deform_conv2d_kernels(library: str, backend: str):
    """The deform_conv2d kernel set for arrays of ``library`` run by ``backend``."""
    if library == "numpy":
        from .numba_kernels.deform_conv import NumbaCpuDeformConv2dKernels

        return NumbaCpuDeformConv2dKernels()
    if backend == "numba":
        from .numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels

        return NumbaCudaDeformConv2dKernels()
    from .cupy_kernels.deform_conv import CupyDeformConv2dKernels

    return CupyDeformConv2dKernels()
