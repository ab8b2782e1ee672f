"""Kernel sets: the per-backend kernels behind each op family's shared driver.

A kernel set has an ``xp`` attribute (the array library: ``numpy`` or ``cupy``) and one method
per kernel of an op family. Backends are imported only when an op first needs them, so
``import pydeform`` compiles nothing and needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import functools
import importlib

# family -> (module name in numba_kernels / cupy_kernels, class name stem)
_FAMILIES = {
    "deform_conv2d": ("deform_conv", "DeformConv2dKernels"),
    "roi": ("roi", "RoIKernels"),
    "centernet": ("centernet", "CenterNetKernels"),
    "deform_pool2d": ("deform_pool", "DeformPool2dKernels"),
    "semiconv": ("semiconv", "SemiConvKernels"),


    "levelset": ("levelset", "LevelSetKernels"),
}


@functools.lru_cache(maxsize=None)
def kernel_set(family: str, library: str, backend: str):
    """The kernel set of ``family`` for arrays of ``library`` (``"numpy"`` / ``"cupy"``) run
    by ``backend`` (``"numba"`` / ``"cupy"``): Numba CPU for NumPy arrays, else Numba CUDA or
    CuPy RawKernels."""
    module, stem = _FAMILIES[family]
    if library == "numpy":
        package, prefix = "numba_kernels", "NumbaCpu"
    elif backend == "numba":
        package, prefix = "numba_kernels", "NumbaCuda"
    else:
        package, prefix = "cupy_kernels", "Cupy"
    return getattr(importlib.import_module(f".{package}.{module}", __name__), prefix + stem)()


def deform_conv2d_kernels(library: str, backend: str):
    return kernel_set("deform_conv2d", library, backend)


def roi_kernels(library: str, backend: str):
    return kernel_set("roi", library, backend)


def centernet_kernels(library: str, backend: str):
    return kernel_set("centernet", library, backend)


def deform_pool2d_kernels(library: str, backend: str):
    return kernel_set("deform_pool2d", library, backend)


def semiconv_kernels(library: str, backend: str):
    return kernel_set("semiconv", library, backend)


def levelset_kernels(library: str, backend: str):
    return kernel_set("levelset", library, backend)
