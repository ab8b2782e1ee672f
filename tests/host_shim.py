"""The CuPy RawKernel sources compiled as plain C++ and run on the CPU, one thread, one block.

g++ compiles a ``.cu`` file of ``pydeform/backends/cupy_kernels`` (its includes inlined exactly
as for NVRTC) with ``cuda_host_shim.h`` force-included and ``cuda_host_include/`` standing in
for CUDA's fp16 / bf16 headers. Each kernel template is instantiated for float and double and
its address exported as a C symbol; ctypes then calls it with the argument tuple built by the
same marshalling functions the CuPy kernel set launches with.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from pydeform.backends.cupy_kernels._compile import kernel_source, template_argument
from pydeform.backends.cupy_kernels.centernet import KERNELS as CENTERNET_KERNELS
from pydeform.backends.cupy_kernels.centernet import CupyCenterNetKernels
from pydeform.backends.cupy_kernels.deform_conv import KERNELS as DEFORM_CONV_KERNELS
from pydeform.backends.cupy_kernels.deform_conv import CupyDeformConv2dKernels
from pydeform.backends.cupy_kernels.roi import KERNELS as ROI_KERNELS
from pydeform.backends.cupy_kernels.roi import CupyRoIKernels

TESTS_DIR = Path(__file__).resolve().parent
BUILD_DIR = TESTS_DIR / "_build"
SHIM_HEADER = TESTS_DIR / "cuda_host_shim.h"
HOST_INCLUDE_DIR = TESTS_DIR / "cuda_host_include"
HOST_TYPES = ("float", "double")
CXX_FLAGS = ("-x", "c++", "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC")


class HostBuildError(RuntimeError):
    """g++ rejected a kernel source; the message carries its output."""


def compiler_available():
    return shutil.which("g++") is not None


def _export_symbol(template, type_name):
    return f"pydeform_host_{template}_{type_name}"


def _translation_unit(source, templates):
    exports = "\n".join(
        f'extern "C" const void* const {_export_symbol(template, type_name)} =\n'
        f"    reinterpret_cast<const void*>(&{template}<{type_name}>);"
        for template in templates
        for type_name in HOST_TYPES
    )
    return f"{source}\n\n// Host shim exports\n{exports}\n"


def _build_inputs_digest(unit):
    digest = hashlib.sha256(unit.encode())
    for header in (SHIM_HEADER, *sorted(HOST_INCLUDE_DIR.iterdir())):
        digest.update(header.read_bytes())
    digest.update(" ".join(CXX_FLAGS).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load_library(name, source, templates):
    """The shared library of CUDA C ``source`` (includes already inlined) exporting each of
    ``templates`` for float and double; rebuilt whenever the source or a shim header changes."""
    unit = _translation_unit(source, templates)
    stem = f"{name}_{_build_inputs_digest(unit)}"
    library = BUILD_DIR / f"{stem}.so"
    if not library.exists():
        BUILD_DIR.mkdir(exist_ok=True)
        unit_path = BUILD_DIR / f"{stem}.cpp"
        unit_path.write_text(unit)
        # Built under a private name and renamed, so that concurrent test processes never load
        # a half-written library.
        partial = BUILD_DIR / f"{stem}.{os.getpid()}.so.partial"
        command = ["g++", *CXX_FLAGS, "-include", str(SHIM_HEADER), "-I", str(HOST_INCLUDE_DIR),
                   str(unit_path), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise HostBuildError(f"{' '.join(command)}\n{result.stdout}{result.stderr}")
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def manifest_library(manifest):
    """The library of a kernel set's ``.cu`` file, built from the text NVRTC compiles."""
    return load_library(Path(manifest.source).stem, kernel_source(manifest.source), manifest.templates)


# Marshalled scalar type -> the C parameter type it stands for; anything else is a pointer.
_SCALAR_CTYPES = {
    np.int64: ctypes.c_longlong,
    np.int32: ctypes.c_int,
    np.float64: ctypes.c_double,
    np.float32: ctypes.c_float,
}


def _ctype(arg):
    return _SCALAR_CTYPES.get(type(arg), ctypes.c_void_p)


def _cvalue(arg):
    if arg is None:
        return None
    if isinstance(arg, np.ndarray):
        if not arg.flags.c_contiguous:
            raise ValueError(f"kernel arrays must be C-contiguous; received strides {arg.strides}")
        return arg.ctypes.data
    return arg.item()


def run_kernel(library, template, storage_dtype, args):
    """Calls ``template<storage_dtype>`` of a host library with a marshalled argument tuple."""
    symbol = _export_symbol(template, template_argument(storage_dtype))
    address = ctypes.c_void_p.in_dll(library, symbol).value
    function = ctypes.CFUNCTYPE(None, *(_ctype(a) for a in args))(address)
    function(*(_cvalue(a) for a in args))


class HostShimLaunch:
    """Mixin for a CuPy kernel set: its launches run on the host shim, on NumPy float32 /
    float64 arrays, from the ``.cu`` file of ``manifest``."""

    xp = np
    manifest = None

    def _launch(self, storage_dtype, template, n_items, args):
        if n_items:
            run_kernel(manifest_library(self.manifest), template, storage_dtype, args)


class HostShimDeformConv2dKernels(HostShimLaunch, CupyDeformConv2dKernels):
    manifest = DEFORM_CONV_KERNELS


class HostShimRoIKernels(HostShimLaunch, CupyRoIKernels):
    manifest = ROI_KERNELS


class HostShimCenterNetKernels(HostShimLaunch, CupyCenterNetKernels):
    manifest = CENTERNET_KERNELS
