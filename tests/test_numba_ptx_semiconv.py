"""Type-check and compile the Numba CUDA semi-convolutional kernels to PTX, without a GPU.

As in tests/test_numba_ptx.py, whose child-process helpers it uses: ``NumbaCudaSemiConvKernels``
is driven on small NumPy arrays of every GPU dtype with its launcher replaced by a recorder, and
``numba.typeof`` of the recorded arguments is the signature given to ``numba.cuda.compile_ptx``
(for sm_70, sm_80 and sm_90, one child process each). Besides the signature, the child reports the
float64 instructions of the PTX: float32 and half-type embeddings must compute in float32 (a float
literal or an int-float product would silently promote it; the simulator hides that). The half
types are converted to float32 before a launch, so their signatures are float32's and each
distinct signature is compiled once per compute capability.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.test_numba_ptx import (
    ARITHMETIC, COMPUTE_CAPABILITIES, DTYPES, check_float32_only, child_results, compile_kernel, compiled_entry,
    target_compute_capability,
)

KERNELS = ("statistics", "loss_grad", "affinity", "affinity_grad_psi", "affinity_grad_centers", "seeded",
           "seeded_grad", "votes", "assign")


def record_launches(dtype_name: str) -> list:
    """(kernel name, kernel, arguments) of every launch of one call of each kernel-set method."""
    import ml_dtypes
    import numpy as np

    from pydeform._arrays import accumulation_dtype
    from pydeform.backends.numba_kernels import semiconv as kernels_module

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    acc = accumulation_dtype(dtype)
    names = {id(kernel): name for kernel, name in zip(kernels_module.cuda_kernels(), KERNELS)}
    launches = []

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    kernels = kernels_module.NumbaCudaSemiConvKernels(xp=np)
    n, dims, height, width, k = 2, 3, 4, 5, 2
    psi = np.zeros((n, dims, height, width), dtype)
    labels = np.ones((n, height, width), np.int32)
    offsets = (np.zeros(dims), np.zeros(dims))
    stats = [np.zeros((n, k, dims), acc), np.zeros((n, k), np.int64), np.zeros((n, k), acc), np.zeros((n, k, dims), acc)]
    kernels.statistics(psi, labels, offsets, *stats, with_norms=True)
    kernels.loss_grad(psi, labels, offsets, stats[0], stats[2], stats[3], np.zeros_like(psi))
    centers, sigma = np.zeros((n, k, dims), dtype), np.ones((n, k), acc)
    maps = np.zeros((n, k, height, width), dtype)
    kernels.affinity(psi, centers, sigma, offsets, maps, 0)
    kernels.affinity_grad(maps, psi, centers, sigma, offsets, np.zeros_like(psi), np.zeros_like(centers),
                          np.zeros((n, k), acc), 0)
    scores = np.zeros((n, height, width), dtype)
    seeds, weights = np.zeros((n, dims), acc), np.zeros((n, height, width), acc)
    kernels.seeded(scores, psi, np.ones(n, acc), offsets, seeds, weights, np.zeros_like(scores), 1)
    kernels.seeded_grad(scores, scores, psi, np.ones(n, acc), offsets, seeds, weights, np.zeros((n, dims), acc),
                        np.zeros_like(scores), np.zeros_like(psi), np.zeros(n, acc), 1)
    foreground = np.ones((n, height, width), bool)
    kernels.votes(psi, foreground, offsets, np.zeros((n, height, width), np.int32))
    kernels.assign(psi, foreground, centers, offsets, np.zeros((n, height, width), np.int32), float("inf"))
    return launches


def compile_all(cc: tuple) -> dict:
    """Child process: ``{dtype: {kernel: compile_kernel's entry}}`` (tests/test_numba_ptx.py)."""
    import numba

    target_compute_capability(cc)
    results, compiled = {}, {}
    for dtype_name in DTYPES:
        per_kernel = results.setdefault(dtype_name, {})
        for name, kernel, args in record_launches(dtype_name):
            signature = tuple(numba.typeof(arg) for arg in args)
            if (name, signature) not in compiled:
                compiled[name, signature] = compile_kernel(kernel, signature, cc)
            per_kernel[name] = compiled[name, signature]
    return results


@pytest.fixture(scope="module", params=COMPUTE_CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def compiled(request):
    return request.param, child_results(__file__, request.param)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_semiconv_kernel_compiles_to_float32_ptx(compiled, dtype, kernel):
    """Compiles for the compute capability; float arrays only in the arithmetic dtype (half
    types converted before a launch); no float64 instruction for float32 / half types; atomics
    only in the votes (integer counts), none in the reductions."""
    entry = compiled_entry(compiled, dtype, kernel)
    floats = {a for a in re.findall(r"Array\((float\w+), 1, 'C'", entry["signature"])}
    assert floats == {ARITHMETIC[dtype]}, entry["signature"]
    check_float32_only(entry, dtype, kernel)
    assert entry["atomics"] == (["atom.global.add.u32"] if kernel == "votes" else []), entry["atomics"]


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
