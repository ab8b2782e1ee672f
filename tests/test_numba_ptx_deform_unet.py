"""Type-check and compile the Numba CUDA deform_pool2d kernels to PTX, without a GPU.

As in tests/test_numba_ptx.py, whose child-process helpers it uses: ``NumbaCudaDeformPool2dKernels``
is driven on small NumPy arrays of every GPU dtype (avg and max, with and without mask and
indices, the deterministic input gradient too) with its launcher replaced by a recorder, and
``numba.typeof`` of the recorded arguments is the signature given to ``numba.cuda.compile_ptx``
for sm_70, sm_80 and sm_90, in a child process (this file run as a script); the tests here judge
what the child reports. (deform_conv_transpose2d runs on deform_conv2d's kernels, and the
deterministic input gradient on deform_conv2d's contribution-list kernels before its own gather:
those are compiled by tests/test_numba_ptx.py.)
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.test_numba_ptx import (
    ARITHMETIC,
    COMPUTE_CAPABILITIES,
    DTYPES,
    check_float32_only,
    child_results,
    compile_kernel,
    compiled_entry,
    target_compute_capability,
)

KERNELS = ("forward", "backward_input", "backward_coord")
GATHER = "backward_input_gather"


def record_launches(dtype_name: str) -> list:
    """(kernel name, kernel, arguments) of every launch of this module's kernels for a forward
    (with and without indices) and a backward (atomic and deterministic) in both modes, with and
    without mask; deform_conv2d's contribution-list launches are replaced by no-ops."""
    import ml_dtypes
    import numpy as np

    from pydeform.backends.numba_kernels import deform_conv as deform_conv_module
    from pydeform.backends.numba_kernels import deform_pool as kernels_module
    from pydeform.deform_unet import deform_pool2d_geometry
    from tests.deform_unet_cases import pool_case_from
    from tests.strategies import build_case

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    acc = np.dtype(ARITHMETIC[dtype_name])
    names = {id(kernel): name for kernel, name in zip(kernels_module._cuda_kernels(acc), KERNELS)}
    names[id(kernels_module._cuda_gather_kernel(acc))] = GATHER
    launches = []

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    deform_conv_module.launch_cuda = lambda kernel, n_items, xp, *args: None
    kernels = kernels_module.NumbaCudaDeformPool2dKernels(xp=np)
    rng = np.random.default_rng(0)
    for with_mask in (True, False):
        conv = build_case(rng, n=1, channels=2, out_channels=2, size=(4, 4), kernel=(2, 2), with_mask=with_mask)
        for mode in ("avg", "max"):
            case = pool_case_from(conv, mode, rng).map_arrays(lambda a: a.astype(dtype))
            g = deform_pool2d_geometry({"input": case.input.shape, "offset": case.offset.shape}, case.kernel_size,
                                       case.stride, case.padding, case.dilation)
            max_mode = mode == "max"
            indices = np.zeros(case.grad_output.shape, np.int32) if max_mode else None
            kernels.forward(case.input, case.offset, case.mask, np.zeros_like(case.grad_output), indices, g, max_mode)
            grad_mask = None if case.mask is None else np.zeros_like(case.mask)
            kernels.backward_coord(case.input, case.offset, case.mask, case.grad_output, indices,
                                   np.zeros_like(case.offset), grad_mask, g, max_mode)
            kernels.backward_input(case.offset, case.mask, case.grad_output, indices,
                                   np.zeros(case.input.shape, acc), g, max_mode)
            kernels.backward_input_deterministic(case.offset, case.mask, case.grad_output, indices,
                                                 np.zeros(case.input.shape, acc), g, max_mode)
    return launches


def compile_all(cc: tuple) -> dict:
    """Child process: ``{dtype: {kernel: {"signature", "return", "target", "atomics"} or {"error"}}}``."""
    import numba

    target_compute_capability(cc)
    results = {}
    for dtype_name in DTYPES:
        per_kernel = results.setdefault(dtype_name, {})
        for name, kernel, args in record_launches(dtype_name):
            signature = tuple(numba.typeof(arg) for arg in args)
            if name not in per_kernel:
                per_kernel[name] = compile_kernel(kernel, signature, cc)
            assert per_kernel[name]["signature"] == str(signature), f"{dtype_name} {name}: two signatures"
    return results


@pytest.fixture(scope="module", params=COMPUTE_CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def compiled(request):
    return request.param, child_results(__file__, request.param)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deform_pool2d_kernel_compiles_to_ptx(compiled, dtype, kernel):
    """Compiled for the child's compute capability, returns nothing, flat C-contiguous arrays:
    floats in the arithmetic dtype only (half types are converted before a launch) and the int32
    indices; the geometry tuple, flags and typed constants; native atomic adds of the arithmetic
    type only in the input-gradient scatter; no float64 instruction where the arithmetic is float32."""
    entry = compiled_entry(compiled, dtype, kernel)
    arithmetic = ARITHMETIC[dtype]
    arrays = set(re.findall(r"Array\((\w+), (\d+), '(\w)'", entry["signature"]))
    assert arrays == {(arithmetic, "1", "C"), ("int32", "1", "C")}, entry["signature"]
    assert "UniTuple(int64, 14)" in entry["signature"] and "bool" in entry["signature"]
    assert f"{arithmetic}, {arithmetic}, int64)" in entry["signature"]  # scale, one, item count
    expected = [f"atom.global.add.f{arithmetic[-2:]}"] if kernel == "backward_input" else []
    assert entry["atomics"] == expected
    if arithmetic == "float32":
        assert entry["f64"] == {}, f"{kernel} ({dtype}): float64 instructions {entry['f64']}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_gather_compiles_to_ptx(compiled, dtype):
    """The deterministic input gradient's gather: the lists' uint64 bucket ends and int64 items,
    float arrays of the arithmetic dtype only, the int32 indices; no atomics; float32
    arithmetic only where that is the arithmetic dtype."""
    entry = compiled_entry(compiled, dtype, GATHER)
    arithmetic = ARITHMETIC[dtype]
    arrays = set(re.findall(r"Array\((\w+), (\d+), '(\w)'", entry["signature"]))
    assert arrays == {(arithmetic, "1", "C"), ("int32", "1", "C"), ("int64", "1", "C"), ("uint64", "1", "C")}, \
        entry["signature"]
    assert f"UniTuple(int64, 14), bool, {arithmetic}, int64)" in entry["signature"]  # geometry, mode, scale, count
    assert entry["atomics"] == []
    check_float32_only(entry, dtype, GATHER)


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
