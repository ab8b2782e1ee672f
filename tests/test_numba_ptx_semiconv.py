"""Type-check and compile the Numba CUDA semi-convolutional kernels to PTX, without a GPU.

As in tests/test_numba_ptx.py, whose child-process helpers it uses: ``NumbaCudaSemiConvKernels``
is driven on small NumPy arrays of every GPU dtype with its launcher replaced by a recorder, and
``numba.typeof`` of the recorded arguments is the signature given to ``numba.cuda.compile_ptx``
(for sm_80, in a child process). Besides the signature, the child reports the float64
arithmetic instructions of the PTX: float32 and half-type embeddings must compute in float32
(a float literal or an int-float product would silently promote it; the simulator hides that).
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.test_numba_ptx import ARITHMETIC, DTYPES, child_results, target_compute_capability

KERNELS = ("statistics", "loss_grad", "affinity", "affinity_grad_psi", "affinity_grad_centers", "seeded",
           "seeded_grad", "votes", "assign")
COMPUTE_CAPABILITY = (8, 0)
FLOAT64_ARITHMETIC = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|neg)(?:\.\w+)*\.f64\b")


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
    """Child process: ``{dtype: {kernel: {"signature", "error"?, "float64", "atomics"}}}``."""
    import traceback

    import numba

    from pydeform.backends.numba_cuda import cuda

    target_compute_capability(cc)
    results = {}
    for dtype_name in DTYPES:
        per_kernel = results.setdefault(dtype_name, {})
        for name, kernel, args in record_launches(dtype_name):
            signature = tuple(numba.typeof(arg) for arg in args)
            entry = {"signature": str(signature)}
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
            except Exception:
                entry["error"] = traceback.format_exc()
            else:
                entry["float64"] = sorted(set(FLOAT64_ARITHMETIC.findall(ptx)))
                entry["atomics"] = sorted(set(re.findall(r"\batom\.[\w.]+", ptx)))
            per_kernel[name] = entry
    return results


@pytest.fixture(scope="module")
def compiled():
    return child_results(__file__, COMPUTE_CAPABILITY)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_semiconv_kernel_compiles_to_float32_ptx(compiled, dtype, kernel):
    """Compiles; float arrays only in the arithmetic dtype (half types converted before a
    launch); no float64 arithmetic for float32 / half types; atomics only in the votes (integer
    counts), none in the reductions."""
    entry = compiled[dtype][kernel]
    assert "error" not in entry, f"{kernel} ({dtype}) {entry['signature']}:\n{entry['error']}"
    floats = {a for a in re.findall(r"Array\((float\w+), 1, 'C'", entry["signature"])}
    assert floats == {ARITHMETIC[dtype]}, entry["signature"]
    if ARITHMETIC[dtype] == "float32":
        assert entry["float64"] == [], f"{kernel} ({dtype}) computes in float64: {entry['float64']}"
    assert entry["atomics"] == (["atom.global.add.u32"] if kernel == "votes" else []), entry["atomics"]


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
