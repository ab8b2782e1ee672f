"""Type-check and compile the Numba CUDA level-set kernels to PTX, without a GPU.

As in tests/test_numba_ptx.py, whose child-process helpers it uses: ``NumbaCudaLevelSetKernels``
is driven on small NumPy arrays (2-D and 3-D, batched, every method) with its launcher replaced
by a recorder, and ``numba.typeof`` of the recorded arguments is the signature given to
``numba.cuda.compile_ptx`` for sm_70, sm_80 and sm_90, in a child process (this file run as a
script). One signature serves 2-D and 3-D (flat arrays and a geometry tuple). The attachment
kernels must hold no FMA and must round their products with ``mul.rn.f64``: NVVM fuses the
products of the MorphGAC attachment into its sum, and ptxas may fuse a plain PTX ``mul.f64``
into the ``sub.f64`` of the MorphACWE one, and the level sets would then differ from
scikit-image's where the terms nearly cancel.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.test_numba_ptx import COMPUTE_CAPABILITIES, child_results, compile_kernel, compiled_entry, \
    target_compute_capability

ATTACHMENTS = ("acwe_attach", "gac_attach")


def record_launches() -> list:
    """(kernel name, kernel, arguments) of every launch of every kernel-set method, on 2-D and
    3-D level sets."""
    import numpy as np

    from pydeform.backends.numba_kernels import levelset as kernels_module

    names = dict(zip(map(id, kernels_module.cuda_kernels()), kernels_module.CUDA_KERNELS))
    launches = []

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    kernels = kernels_module.NumbaCudaLevelSetKernels(xp=np)
    for shape in ((2, 4, 5), (2, 3, 4, 5)):
        image = np.zeros(shape)
        padded = (2, *(n + 2 for n in shape[1:]))
        u, spare = np.zeros(padded, np.uint8), np.zeros(padded, np.uint8)
        kernels.sup_inf(u, spare)
        kernels.inf_sup(u, spare)
        means = np.zeros((2, 2))
        kernels.acwe_means(u, image, np.zeros((int(np.prod(shape[:-1])), 4)), means)
        kernels.acwe_attach(u, image, means, 1.0, 2.0, spare)
        kernels.gac_balloon(u, image, np.zeros(2), True, spare)
        kernels.gac_attach(u, np.zeros((2, len(shape) - 1, *shape[1:])), spare)
    phi, image, partial, stats = np.zeros((2, 4, 5)), np.zeros((2, 4, 5)), np.zeros((8, 5)), np.zeros((2, 3))
    kernels.chan_vese_start(phi, image, partial, stats)
    kernels.chan_vese_step(phi, image, stats, 0.25, 1.0, 1.0, 0.5, np.ones(2, np.uint8), np.zeros_like(phi), partial)
    return launches


def compile_all(cc: tuple) -> dict:
    """Child process: ``{kernel: compile_kernel's entry}`` for ``cc``, one signature per kernel."""
    import numba

    target_compute_capability(cc)
    results = {}
    for name, kernel, args in record_launches():
        signature = tuple(numba.typeof(arg) for arg in args)
        if name not in results:
            results[name] = compile_kernel(kernel, signature, cc)
        assert results[name]["signature"] == str(signature), f"{name}: two launches with different signatures"
    return results


@pytest.fixture(scope="module", params=COMPUTE_CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def compiled(request):
    return request.param, {"float64": child_results(__file__, request.param)}


@pytest.mark.slow
def test_every_kernel_is_launched(compiled):
    from pydeform.backends.numba_kernels.levelset import CUDA_KERNELS

    assert sorted(compiled[1]["float64"]) == sorted(CUDA_KERNELS)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["curvature", "acwe_row_sums", "acwe_means", "acwe_attach", "gac_balloon",
                                    "gac_attach", "chan_vese_sums", "chan_vese_step", "chan_vese_stats"])
def test_levelset_kernel_compiles_to_ptx(compiled, kernel):
    """Compiles for the compute capability; flat arrays only; no atomics (the reductions add in
    a fixed order); the attachments hold no FMA, their products rounded as NumPy's
    (``mul.rn.f64``, and ``add.rn.f64`` for the MorphACWE difference)."""
    entry = compiled_entry(compiled, "float64", kernel)
    ranks = re.findall(r"Array\(\w+, (\d+), 'C'", entry["signature"])
    assert ranks and set(ranks) == {"1"}, entry["signature"]
    assert entry["atomics"] == []
    if kernel in ATTACHMENTS:
        f64 = entry["f64"]
        assert not any(opcode.startswith("fma") for opcode in f64), f"{kernel}: {f64}"
        assert "mul.rn.f64" in f64, f64
        if kernel == "acwe_attach":
            assert "add.rn.f64" in f64, f64


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
