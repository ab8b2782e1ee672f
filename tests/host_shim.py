"""The CuPy RawKernel sources compiled as plain C++ and run on the CPU: one thread of one block,
threaded blocks, or every logical thread of a grid in a shuffled order (see cuda_host_shim.h).

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
import threading
from pathlib import Path

import numpy as np

from pydeform.backends.cupy_kernels._compile import DEFINES, kernel_source, template_argument
from pydeform.backends.cupy_kernels.centernet import KERNELS as CENTERNET_KERNELS
from pydeform.backends.cupy_kernels.centernet import CupyCenterNetKernels
from pydeform.backends.cupy_kernels.deform_conv import KERNELS as DEFORM_CONV_KERNELS
from pydeform.backends.cupy_kernels.deform_conv import CupyDeformConv2dKernels
from pydeform.backends.cupy_kernels.deform_pool import KERNELS as DEFORM_POOL_KERNELS
from pydeform.backends.cupy_kernels.deform_pool import CupyDeformPool2dKernels
from pydeform.backends.cupy_kernels.levelset import KERNELS as LEVELSET_KERNELS
from pydeform.backends.cupy_kernels.levelset import CupyLevelSetKernels
from pydeform.backends.cupy_kernels.roi import KERNELS as ROI_KERNELS
from pydeform.backends.cupy_kernels.roi import CupyRoIKernels
from pydeform.backends.cupy_kernels.semiconv import KERNELS as SEMICONV_KERNELS
from pydeform.backends.cupy_kernels.semiconv import CupySemiConvKernels

TESTS_DIR = Path(__file__).resolve().parent
BUILD_DIR = TESTS_DIR / "_build"
SHIM_HEADER = TESTS_DIR / "cuda_host_shim.h"
HOST_INCLUDE_DIR = TESTS_DIR / "cuda_host_include"
HOST_TYPES = ("float", "double")
CXX_FLAGS = ("-x", "c++", "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", *DEFINES)
THREADED_FLAGS = ("-DPYDEFORM_HOST_SHIM_BLOCK_THREADS", "-pthread")
SHUFFLED_FLAGS = ("-DPYDEFORM_HOST_SHIM_SHUFFLED", "-pthread")
# Undefined behaviour a GPU would not report (a float-to-integer conversion out of range
# saturates there, e.g. a sample count of LLONG_MAX) stops the process with a report instead. The
# sanitizer aborts the process, so load such a library in a child process.
SANITIZER_FLAGS = ("-fsanitize=float-cast-overflow,undefined", "-fno-sanitize-recover=all")
# A threaded block that has not finished after this long is taken as deadlocked (a __syncthreads
# that not every thread of the block reaches).
BLOCK_TIMEOUT_S = 60


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


def _build_inputs_digest(unit, flags):
    digest = hashlib.sha256(unit.encode())
    for header in (SHIM_HEADER, *sorted(HOST_INCLUDE_DIR.iterdir())):
        digest.update(header.read_bytes())
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()[:16]


# Execution models of the shim (cuda_host_shim.h): compile flags and library name suffix.
_MODELS = {
    "single": ((), ""),
    "threaded": (THREADED_FLAGS, "_threaded"),
    "shuffled": (SHUFFLED_FLAGS, "_shuffled"),
}


@functools.lru_cache(maxsize=None)
def load_library(name, source, templates, threaded=False, model=None, extra_flags=()):
    """The shared library of CUDA C ``source`` (includes already inlined) exporting each of
    ``templates`` for float and double; rebuilt whenever the source or a shim header changes.
    ``threaded``: the shim's threaded-block model (see cuda_host_shim.h and run_blocks);
    ``model="shuffled"``: its shuffled-threads model (run_shuffled); ``extra_flags``: more g++
    options (e.g. SANITIZER_FLAGS), part of the library's name."""
    unit = _translation_unit(source, templates)
    model_flags, suffix = _MODELS[model or ("threaded" if threaded else "single")]
    flags = (*CXX_FLAGS, *model_flags, *extra_flags)
    stem = f"{name}{suffix}_{_build_inputs_digest(unit, flags)}"
    library = BUILD_DIR / f"{stem}.so"
    if not library.exists():
        BUILD_DIR.mkdir(exist_ok=True)
        unit_path = BUILD_DIR / f"{stem}.cpp"
        unit_path.write_text(unit)
        # Built under a private name and renamed, so that concurrent test processes never load
        # a half-written library.
        partial = BUILD_DIR / f"{stem}.{os.getpid()}.so.partial"
        command = ["g++", *flags, "-include", str(SHIM_HEADER), "-I", str(HOST_INCLUDE_DIR),
                   str(unit_path), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise HostBuildError(f"{' '.join(command)}\n{result.stdout}{result.stderr}")
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def manifest_library(manifest, threaded=False, model=None, extra_flags=()):
    """The library of a kernel set's ``.cu`` file, built from the text NVRTC compiles."""
    return load_library(Path(manifest.source).stem, kernel_source(manifest.source), manifest.templates, threaded,
                        model, extra_flags)


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


def _kernel_function(library, template, storage_dtype, args):
    symbol = _export_symbol(template, template_argument(storage_dtype))
    address = ctypes.c_void_p.in_dll(library, symbol).value
    return ctypes.CFUNCTYPE(None, *(_ctype(a) for a in args))(address)


def run_kernel(library, template, storage_dtype, args):
    """Calls ``template<storage_dtype>`` of a host library with a marshalled argument tuple."""
    _kernel_function(library, template, storage_dtype, args)(*(_cvalue(a) for a in args))


def run_blocks(library, template, storage_dtype, args, grid, block):
    """Runs ``template<storage_dtype>`` of a threaded host library as ``grid`` blocks of ``block``
    threads: block after block, each block's threads concurrently (ctypes releases the GIL during
    the call, so they really run in parallel and meet at the shim's barrier)."""
    function = _kernel_function(library, template, storage_dtype, args)
    values = [_cvalue(a) for a in args]
    library.pydeform_host_configure(ctypes.c_uint(grid), ctypes.c_uint(block))

    def thread_body(block_index, thread_index):
        library.pydeform_host_enter(ctypes.c_uint(block_index), ctypes.c_uint(thread_index))
        function(*values)

    for block_index in range(grid):
        _run_threads([threading.Thread(target=thread_body, args=(block_index, t), daemon=True) for t in range(block)],
                     f"{template}: block {block_index} of {grid} did not finish (deadlock?)")


def _run_threads(threads, hang_message):
    """Starts ``threads`` and waits for them; a thread still running after BLOCK_TIMEOUT_S is
    reported with ``hang_message``."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BLOCK_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(hang_message)


def run_shuffled(library, template, storage_dtype, args, grid, block, order, workers):
    """Runs ``template<storage_dtype>`` of a shuffled-model host library as ``grid`` blocks of
    ``block`` threads: each logical thread is one call, the calls taken in ``order`` (a
    permutation of the ``grid * block`` logical threads, block-major) by ``workers`` OS threads
    at once (ctypes releases the GIL during a call)."""
    function = _kernel_function(library, template, storage_dtype, args)
    values = [_cvalue(a) for a in args]
    library.pydeform_host_configure(ctypes.c_uint(grid), ctypes.c_uint(block))
    queue = iter(order)
    take = threading.Lock()
    failures = []

    def worker():
        try:
            while True:
                with take:
                    logical = next(queue, None)
                if logical is None:
                    return
                library.pydeform_host_enter(ctypes.c_uint(logical // block), ctypes.c_uint(logical % block))
                function(*values)
        except BaseException as error:  # re-raised in the launching thread
            failures.append(error)

    _run_threads([threading.Thread(target=worker, daemon=True) for _ in range(workers)],
                 f"{template}: a shuffled launch did not finish")
    if failures:
        raise failures[0]


class HostShimLaunch:
    """Mixin for a CuPy kernel set: its launches run on the host shim, on NumPy float32 /
    float64 arrays, from the ``.cu`` file of ``manifest`` built with ``extra_flags`` too."""

    xp = np
    manifest = None
    extra_flags = ()

    def _launch(self, storage_dtype, template, n_items, args):
        if n_items:
            run_kernel(manifest_library(self.manifest, extra_flags=self.extra_flags), template, storage_dtype, args)


class HostShimBlocksLaunch(HostShimLaunch):
    """As HostShimLaunch, on the threaded-block shim: each launch runs min(its block count,
    ``grid``) blocks of ``block`` threads."""

    grid = 1
    block = 1

    @classmethod
    def with_blocks(cls, grid, block):
        """A kernel set (made with no arguments) whose launches run ``grid`` blocks of ``block``
        threads at most."""
        kernels = cls()
        kernels.grid, kernels.block = grid, block
        return kernels

    def _launch(self, storage_dtype, template, n_blocks, args):
        if n_blocks:
            run_blocks(manifest_library(self.manifest, threaded=True, extra_flags=self.extra_flags), template,
                       storage_dtype, args, min(n_blocks, self.grid), self.block)


class HostShimShuffledLaunch(HostShimLaunch):
    """As HostShimLaunch, on the shuffled-threads shim: each launch runs min(its block count,
    ``grid``) blocks of ``block`` threads, the logical threads in an order drawn from ``seed``
    (a new permutation per launch) on ``workers`` OS threads, with real atomics."""

    def __init__(self, grid, block, seed, workers=4):
        self.grid, self.block, self.workers = grid, block, workers
        self.rng = np.random.default_rng(seed)

    def _launch(self, storage_dtype, template, n_items, args):
        if n_items:
            grid = min(-(-n_items // self.block), self.grid)
            run_shuffled(manifest_library(self.manifest, model="shuffled"), template, storage_dtype, args, grid,
                         self.block, self.rng.permutation(grid * self.block).tolist(), self.workers)


class HostShimDeformConv2dKernels(HostShimLaunch, CupyDeformConv2dKernels):
    manifest = DEFORM_CONV_KERNELS


class HostShimDeformPool2dKernels(HostShimLaunch, CupyDeformPool2dKernels):
    manifest = DEFORM_POOL_KERNELS

    @staticmethod
    def _deform_conv_kernels():
        return HostShimDeformConv2dKernels()


class HostShimRoIKernels(HostShimLaunch, CupyRoIKernels):
    manifest = ROI_KERNELS


class HostShimShuffledDeformConv2dKernels(HostShimShuffledLaunch, CupyDeformConv2dKernels):
    manifest = DEFORM_CONV_KERNELS


class HostShimShuffledRoIKernels(HostShimShuffledLaunch, CupyRoIKernels):
    manifest = ROI_KERNELS


class HostShimShuffledDeformPool2dKernels(HostShimShuffledLaunch, CupyDeformPool2dKernels):
    """The deterministic input gradient's contribution lists come from deform_conv.cu's
    kernels, shuffled alike (their own order: seed + 1)."""

    manifest = DEFORM_POOL_KERNELS

    def __init__(self, grid, block, seed, workers=4):
        super().__init__(grid, block, seed, workers)
        self.deform_conv_kernels = HostShimShuffledDeformConv2dKernels(grid, block, seed + 1, workers)

    def _deform_conv_kernels(self):
        return self.deform_conv_kernels


class SanitizedHostShimRoIKernels(HostShimRoIKernels):
    """The RoI kernels built with SANITIZER_FLAGS: only in a child process."""

    extra_flags = SANITIZER_FLAGS


class HostShimCenterNetKernels(HostShimLaunch, CupyCenterNetKernels):
    manifest = CENTERNET_KERNELS


class HostShimBlocksCenterNetKernels(HostShimBlocksLaunch, CupyCenterNetKernels):
    """The CenterNet kernels as ``grid`` blocks of ``block`` threads, decode tiles of ``decode_tile``."""

    manifest = CENTERNET_KERNELS

    def __init__(self, grid, block, decode_tile):
        super().__init__(decode_tile)
        self.grid = grid
        self.block = block


class HostShimSemiConvKernels(HostShimLaunch, CupySemiConvKernels):
    manifest = SEMICONV_KERNELS


class HostShimBlocksSemiConvKernels(HostShimBlocksLaunch, CupySemiConvKernels):
    """The semi-convolutional kernels as ``grid`` blocks of ``block`` threads."""

    manifest = SEMICONV_KERNELS

    def __init__(self, grid, block):
        self.grid = grid
        self.block = block


class HostShimLevelSetKernels(HostShimLaunch, CupyLevelSetKernels):
    manifest = LEVELSET_KERNELS


class HostShimBlocksLevelSetKernels(HostShimBlocksLaunch, CupyLevelSetKernels):
    """The level-set kernels as blocks of threads (see with_blocks)."""

    manifest = LEVELSET_KERNELS
