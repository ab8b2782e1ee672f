"""``sup_inf`` and ``inf_sup`` on arrays that are not 0/1 level sets read them as scikit-image's
do (SciPy's binary morphology: every non-zero element, negative and NaN included, is 1), on the
reference, the Numba CPU kernels, the CUDA C kernels through the host shim and, gpu-marked, both
GPU kernel sets. (The snakes binarise ``init_level_set`` with ``> 0``, as scikit-image does.)"""

from __future__ import annotations

import numpy as np
import pytest

from pydeform import levelset
from reference import levelset as ref
from tests.levelset_cases import kernels_named, morphsnakes


def non_binary_arrays():
    rng = np.random.default_rng(0)
    with_nan = rng.standard_normal((5, 6))
    with_nan[rng.random((5, 6)) < 0.3] = 0
    with_nan[1, 2] = with_nan[4, 0] = np.nan
    return {"negative-ints": rng.integers(-1, 2, (5, 6)), "floats-and-nan": with_nan,
            "3d-negative": rng.integers(-2, 2, (3, 4, 5)).astype(np.int8), "bool": rng.random((4, 4)) < 0.5,
            "uint8": rng.integers(0, 3, (4, 5)).astype(np.uint8)}


@pytest.mark.parametrize("name", non_binary_arrays())
def test_reference_reads_non_zero_as_one(name):
    u = non_binary_arrays()[name]
    np.testing.assert_array_equal(ref.sup_inf(u), morphsnakes.sup_inf(u))
    np.testing.assert_array_equal(ref.inf_sup(u), morphsnakes.inf_sup(u))


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("name", non_binary_arrays())
def test_ops_read_non_zero_as_one(backend, name):
    u = non_binary_arrays()[name]
    copy = u.copy()
    with kernels_named(backend):
        np.testing.assert_array_equal(levelset.sup_inf(u), morphsnakes.sup_inf(u))
        np.testing.assert_array_equal(levelset.inf_sup(u), morphsnakes.inf_sup(u))
    np.testing.assert_array_equal(u, copy)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("name", non_binary_arrays())
def test_gpu_reads_non_zero_as_one(backend, name):
    import cupy

    u = non_binary_arrays()[name]
    for op, theirs in ((levelset.sup_inf, morphsnakes.sup_inf), (levelset.inf_sup, morphsnakes.inf_sup)):
        np.testing.assert_array_equal(cupy.asnumpy(op(cupy.asarray(u), backend=backend)), theirs(u))
