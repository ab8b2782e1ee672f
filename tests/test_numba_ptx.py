"""Type-check and compile the Numba CUDA kernels of deform_conv2d and of the RoI ops to PTX,
without a GPU.

The argument types are not written by hand: the kernel sets ``NumbaCudaDeformConv2dKernels``
and ``NumbaCudaRoIKernels`` are driven on small NumPy arrays of every GPU dtype (every RoI op,
with and without its optional arrays) with their launcher replaced by a recorder,
and ``numba.typeof`` of the recorded arguments is the signature given to
``numba.cuda.compile_ptx`` (libNVVM from the nvidia-cuda-nvcc wheel), for sm_70, sm_80, sm_90.

numba-cuda compiles a kernel's *device* functions for the current device's compute
capability (``CUDADispatcher.compile_device`` asks ``get_current_device()``), which needs a
driver. So each compute capability is compiled in a child process (this file run as a script)
in which that lookup answers with the target compute capability; the child prints what it
compiled as JSON and the tests here judge it. Nothing of this touches the test process's Numba.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_CAPABILITIES = [(7, 0), (8, 0), (9, 0)]
DTYPES = ("float32", "float64", "float16", "bfloat16")
KERNELS = ("im2col", "col2im_coord", "col2im")
ROI_FAMILIES = ("roi_align", "roi_pool", "deform_roi_pool", "deform_psroi_pool")
ROI_KERNELS = tuple(f"{family}_{step}" for family in ROI_FAMILIES for step in ("forward", "backward"))
# The deterministic backward's kernels (pydeform/backends/numba_kernels/contributions.py): the
# sort, deform_conv2d's col2im lists and gather, every RoI family's lists and gather, and the
# deform families' partials and parameter sums.
DETERMINISTIC_KERNELS = ("contribution_lists_sort", "col2im_lists", "col2im_gather") + tuple(
    f"{family}_{step}" for family in ROI_FAMILIES
    for step in ("lists", "gather") + (("partials", "params_sum") if family.startswith("deform") else ())
)
# Those that list contributions, with integer atomics only (the counts and the cursors).
LISTING_KERNELS = tuple(name for name in DETERMINISTIC_KERNELS if name.endswith("_lists"))
# Kernel arithmetic dtype by storage dtype: half types are converted to float32 before a launch.
ARITHMETIC = {"float32": "float32", "float64": "float64", "float16": "float32", "bfloat16": "float32"}


def record_launches(dtype_name: str) -> list:
    """(kernel name, kernel, arguments) of every launch the kernel set makes for one forward
    and one backward step (with and without mask) on arrays of ``dtype_name``."""
    import ml_dtypes
    import numpy as np

    from pydeform.backends.numba_kernels import contributions
    from pydeform.backends.numba_kernels import deform_conv as kernels_module
    from pydeform.deform_conv import _prepare
    from tests.strategies import build_case

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    acc = np.float64 if dtype == np.float64 else np.float32
    launches = []
    names = {id(kernel): name for kernel, name in zip(kernels_module._cuda_kernels(np.dtype(acc)), KERNELS)}
    names.update({id(kernel): name for kernel, name in zip(kernels_module._cuda_deterministic_kernels(np.dtype(acc)),
                                                          ("col2im_lists", "col2im_gather"))})
    names[id(contributions.sort_kernel())] = "contribution_lists_sort"

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    kernels = kernels_module.NumbaCudaDeformConv2dKernels(xp=np)
    for with_mask in (True, False):
        case = build_case(
            np.random.default_rng(0), n=1, channels=2, out_channels=2, size=(4, 4), kernel=(2, 2),
            with_mask=with_mask, dtype=np.float32,
        )
        _, _, geometry = _prepare(
            case.input, case.offset, case.weight, None, 1, 0, 1, case.mask, None
        )
        input, offset = case.input.astype(dtype), case.offset.astype(dtype)
        mask = None if case.mask is None else case.mask.astype(dtype)
        rows, pixels = 2 * 2 * 2, geometry.out_h * geometry.out_w  # C * kh * kw, Ho * Wo
        columns = np.zeros((1, rows, pixels), acc)
        kernels.im2col(input, offset, mask, columns, geometry)
        grad_mask = None if mask is None else np.zeros_like(mask)
        kernels.col2im_coord(input, offset, mask, columns, np.zeros_like(offset), grad_mask, geometry)
        kernels.col2im(offset, mask, columns, np.zeros(input.shape, acc), geometry)
        kernels.col2im_deterministic(offset, mask, columns, np.zeros(input.shape, acc), geometry)
    return launches


def record_roi_launches(dtype_name: str) -> list:
    """(kernel name, kernel, arguments) of every launch of the RoI kernel set for the forward and
    backward of every op, with and without its optional arrays, on arrays of ``dtype_name``.

    The ops take float16 / bfloat16 arrays only on the GPU, so the kernel-set calls are recorded
    from the ops on float32 (float64) arrays and replayed with the storage-dtype arrays converted:
    all but rois and the gradients, which are in the accumulation dtype."""
    import ml_dtypes
    import numpy as np

    import pydeform
    from pydeform.backends.numba_kernels import contributions
    from pydeform.backends.numba_kernels import roi as kernels_module
    from tests.roi_kernel_set_checks import in_storage_dtype, recorded_call
    from tests.strategies import build_roi_case

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    acc = np.float64 if dtype == np.float64 else np.float32
    names = {id(contributions.sort_kernel()): "contribution_lists_sort"}
    for family in ROI_FAMILIES:
        forward, backward = kernels_module.cuda_kernels(family, np.dtype(acc))
        names[id(forward)], names[id(backward)] = f"{family}_forward", f"{family}_backward"
        for step, kernel in zip(("lists", "gather", "partials", "params_sum"),
                                kernels_module.cuda_deterministic_kernels(family, np.dtype(acc))):
            names[id(kernel)] = f"{family}_{step}"
    launches = []

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    kernels = kernels_module.NumbaCudaRoIKernels(xp=np)
    rng = np.random.default_rng(0)

    def array(*shape):  # for two rois
        return rng.standard_normal((2,) + shape).astype(acc)

    optional = {
        "roi_align": [dict(output_size=2, mode="max")], "ps_roi_align": [dict(output_size=2)],
        "roi_pool": [dict(output_size=2)], "ps_roi_pool": [dict(output_size=2)],
        "deform_roi_pool": [dict(output_size=2), dict(output_size=2, offset=array(2, 2, 2), mask=array(1, 2, 2))],
        "deform_psroi_pool": [dict(group_size=2, pooled_size=2),
                              dict(group_size=2, pooled_size=2, trans=array(2, 2, 2))],
    }
    for op, variants in optional.items():
        for options in variants:
            case = build_roi_case(op, rng, acc, channels=4, size=(4, 4), kinds=("inside", "huge"), **options)
            for run in (case.forward, case.backward, lambda module: case.backward(module, deterministic=True)):
                method, args = recorded_call(lambda: run(pydeform))
                getattr(kernels, method)(*in_storage_dtype(method, args, dtype))
    return launches


def target_compute_capability(cc: tuple) -> None:
    """Child process: make numba-cuda compile device functions for ``cc`` (see the docstring)."""
    import types as pytypes

    import numba.cuda.dispatcher

    numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)


# A PTX instruction (after an optional predicate guard) whose opcode has a .f64 part: arithmetic,
# comparison, conversion to or from float64, a float64 load / store / move or atomic.
F64_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*\.f64\b[\w.]*)", re.M)


def f64_instructions(ptx: str) -> dict:
    """``{opcode: count}`` of the float64 instructions in ``ptx``."""
    counts: dict = {}
    for opcode in F64_INSTRUCTION.findall(ptx):
        counts[opcode] = counts.get(opcode, 0) + 1
    return dict(sorted(counts.items()))


def compile_kernel(kernel, signature, cc: tuple) -> dict:
    """Child process: ``{"signature", "return", "target", "atomics", "f64"}`` of ``kernel``
    compiled to PTX for ``cc`` (``"f64"``: :func:`f64_instructions`), or
    ``{"signature", "error"}``."""
    from pydeform.backends.numba_cuda import cuda

    try:
        ptx, return_type = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
    except Exception:
        return {"signature": str(signature), "error": traceback.format_exc()}
    return {
        "signature": str(signature),
        "return": str(return_type),
        "target": re.findall(r"^\.target\s+(\S+)", ptx, re.M),
        "atomics": sorted(set(re.findall(r"\batom\.[\w.]+", ptx))),
        "f64": f64_instructions(ptx),
    }


def compile_all(cc: tuple) -> dict:
    """Child process: compile every recorded launch for ``cc``; returns
    ``{dtype: {kernel: {"signature", "return", "target", "atomics"} or {"error"}}}``."""
    import numba

    target_compute_capability(cc)
    results, compiled = {}, {}
    for dtype_name in DTYPES:
        per_kernel = results.setdefault(dtype_name, {})
        for name, kernel, args in record_launches(dtype_name) + record_roi_launches(dtype_name):
            signature = tuple(numba.typeof(arg) for arg in args)
            if (name, signature) not in compiled:
                compiled[name, signature] = compile_kernel(kernel, signature, cc)
            entry = compiled[name, signature]
            previous = per_kernel.setdefault(name, entry)
            assert previous == entry, f"{dtype_name} {name}: two launches with different signatures"
    return results


def child_results(script, cc: tuple) -> dict:
    """Run ``script`` with the argument ``major.minor`` in a child process without the CUDA
    simulator; its last line of output, read as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    result = subprocess.run(
        [sys.executable, str(script), f"{cc[0]}.{cc[1]}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"PTX child for sm_{cc[0]}{cc[1]} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=COMPUTE_CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def compiled(request):
    return request.param, child_results(__file__, request.param)


def compiled_entry(compiled, dtype, kernel) -> dict:
    """The child's entry of ``kernel`` in ``dtype``, compiled without error for the child's
    compute capability, returning nothing."""
    cc, results = compiled
    entry = results[dtype][kernel]
    assert "error" not in entry, f"{kernel} ({dtype}) {entry['signature']}:\n{entry['error']}"
    assert entry["return"] == "none"
    assert entry["target"] == [f"sm_{cc[0]}{cc[1]}"]
    return entry


def check_compiled(compiled, dtype, kernel, tuples, scatters):
    """The kernel compiled for the child's compute capability, returns nothing, takes 1-d
    C-contiguous arrays of the arithmetic dtype only (flat views), has the tuple arguments
    ``tuples`` in its signature, uses native atomic adds of the arithmetic type exactly
    when it ``scatters``, and computes in float32 only when that is the arithmetic dtype."""
    entry = compiled_entry(compiled, dtype, kernel)
    arithmetic = ARITHMETIC[dtype]
    arrays = re.findall(r"Array\((\w+), (\d+), '(\w)'", entry["signature"])
    assert arrays and set(arrays) == {(arithmetic, "1", "C")}, entry["signature"]
    assert all(t in entry["signature"] for t in tuples), entry["signature"]
    assert entry["atomics"] == ([f"atom.global.add.f{arithmetic[-2:]}"] if scatters else [])
    check_float32_only(entry, dtype, kernel)


def check_float32_only(entry, dtype, kernel):
    """A kernel whose arithmetic dtype is float32 has no float64 instruction at all: float64
    runs at 1/32 to 1/64 of the float32 rate on most GPUs, and the simulator (which evaluates
    in NumPy) would never show it."""
    if ARITHMETIC[dtype] == "float32":
        assert entry["f64"] == {}, f"{kernel} ({dtype}): float64 instructions {entry['f64']}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_compiles_to_ptx(compiled, dtype, kernel):
    # geometry and has_mask; only col2im scatters (the input gradient).
    check_compiled(compiled, dtype, kernel, ["UniTuple(int64, 16)", "bool"], kernel == "col2im")


@pytest.mark.parametrize("kernel", ROI_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_kernel_compiles_to_ptx(compiled, dtype, kernel):
    # shape = (N, C, H, W, C_out, PH, PW) and the op's param record; backward kernels scatter.
    check_compiled(compiled, dtype, kernel, ["UniTuple(int64, 7)", "Tuple(int64"], kernel.endswith("_backward"))


@pytest.mark.parametrize("kernel", DETERMINISTIC_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_kernel_compiles_to_ptx(compiled, dtype, kernel):
    """The deterministic backward's kernels: their float arrays of the arithmetic dtype, their
    integer arrays the lists' int64 keys and uint64 bucket counts, no float atomics (the
    listing kernels count and claim slots with 64-bit integer atomics; the others none), and
    float32 arithmetic only where that is the arithmetic dtype."""
    entry = compiled_entry(compiled, dtype, kernel)
    arrays = set(re.findall(r"Array\((\w+), (\d+), '(\w)'", entry["signature"]))
    floats = {array for array in arrays if array[0].startswith("float")}
    assert floats == {(ARITHMETIC[dtype], "1", "C")}, entry["signature"]
    assert arrays - floats <= {("int64", "1", "C"), ("uint64", "1", "C")}, entry["signature"]
    assert entry["atomics"] == (["atom.global.add.u64"] if kernel in LISTING_KERNELS else [])
    check_float32_only(entry, dtype, kernel)


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
