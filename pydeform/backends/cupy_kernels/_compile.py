"""Loading, compiling and launching the CUDA C sources of this folder with CuPy.

CuPy is imported inside the functions only: ``import pydeform`` must work without it.
"""

import functools
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..compile_notice import watching_cupy_build

KERNEL_DIR = Path(__file__).resolve().parent

THREADS_PER_BLOCK = 256

# Macros the sources are compiled with: every launch's block size, which also sizes the shared
# per-thread arrays of the block kernels (common.cuh's kThreadsPerBlock).
DEFINES = (f"-DPYDEFORM_THREADS_PER_BLOCK={THREADS_PER_BLOCK}",)
# NVRTC options besides the architecture, which CuPy picks for the current device and adds
# itself together with ``-I`` for CUDA's headers (cuda_fp16.h, cuda_bf16.h).
COMPILE_OPTIONS = ("--std=c++17", *DEFINES)
# Kernels loop grid-stride, so a bounded grid covers any number of work items.
MAX_BLOCKS = 65535

# Storage dtype name -> the C++ type the kernel templates are instantiated with.
TEMPLATE_ARGUMENTS = {
    "float32": "float",
    "float64": "double",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
}

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


class KernelManifest(NamedTuple):
    """The kernel templates a ``.cu`` file of this folder defines, each templated on the storage type."""

    source: str
    templates: tuple


def template_argument(dtype):
    name = np.dtype(dtype).name
    if name not in TEMPLATE_ARGUMENTS:
        raise TypeError(
            f"CUDA kernels support {', '.join(TEMPLATE_ARGUMENTS)}; received dtype {name}"
        )
    return TEMPLATE_ARGUMENTS[name]


def name_expression(template, type_name):
    return f"{template}<{type_name}>"


@functools.lru_cache(maxsize=None)
def kernel_source(filename):
    """The text of ``filename`` with its ``#include "..."`` files inlined, each once (their
    ``#pragma once`` dropped, as it would now refer to the whole text).

    Inlining makes the compiled text, and so CuPy's disk-cache key, cover the headers too.
    """
    return _inline_includes(filename, set())


def _inline_includes(filename, included):
    included.add(filename)
    lines = (KERNEL_DIR / filename).read_text().splitlines()
    out = [f'#line 1 "{filename}"']
    for number, line in enumerate(lines, start=1):
        match = _LOCAL_INCLUDE.match(line)
        if match is None:
            out.append("" if _PRAGMA_ONCE.match(line) else line)
            continue
        if match.group(1) not in included:
            out.append(_inline_includes(match.group(1), included))
        out.append(f'#line {number + 1} "{filename}"')
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _module(manifest, type_name, device_id):
    import cupy

    # One module per device: NVRTC compiles for the architecture of the current device.
    module = cupy.RawModule(
        code=kernel_source(manifest.source),
        options=COMPILE_OPTIONS,
        name_expressions=[name_expression(t, type_name) for t in manifest.templates],
    )
    with watching_cupy_build(manifest.source, type_name):
        module.compile()  # here rather than at the first get_function, to tell a compile from a cache load
    return module


@functools.lru_cache(maxsize=None)
def _kernel(manifest, template, type_name, device_id):
    import cupy

    with cupy.cuda.Device(device_id):
        return _module(manifest, type_name, device_id).get_function(
            name_expression(template, type_name)
        )


def grid_blocks(n_items):
    return min(-(-n_items // THREADS_PER_BLOCK), MAX_BLOCKS)


def kernel_arguments(args):
    """``args`` as CuPy passes them: None becomes a pointer-sized zero, because CuPy passes None
    as a null argument slot (the driver's kernelParams[i] == NULL), not as a null pointer value."""
    return tuple(np.uint64(0) if a is None else a for a in args)


def launch(manifest, template, dtype, n_items, args):
    """Runs ``template<dtype>`` over ``n_items`` work items on CuPy's current device and stream.

    ``args`` holds arrays, None for an absent (null) pointer, and numpy integer scalars whose
    width matches the kernel signature.
    """
    launch_blocks(manifest, template, dtype, grid_blocks(n_items), args)


def launch_blocks(manifest, template, dtype, n_blocks, args):
    """Runs ``template<dtype>`` as ``min(n_blocks, MAX_BLOCKS)`` blocks of THREADS_PER_BLOCK
    threads on CuPy's current device and stream; for kernels whose blocks loop block-stride over
    ``n_blocks`` jobs of a block each (``args`` as for :func:`launch`)."""
    if n_blocks == 0:
        return
    import cupy

    kernel = _kernel(manifest, template, template_argument(dtype), cupy.cuda.Device().id)
    kernel((min(n_blocks, MAX_BLOCKS),), (THREADS_PER_BLOCK,), kernel_arguments(args))
