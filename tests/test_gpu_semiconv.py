"""The semi-convolutional ops on a real GPU: both GPU kernel sets (CuPy RawKernels and Numba
CUDA) against the float64 reference, half types, and bit-identical reductions across runs.

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py); the same kernels
run on the CPU through the host shim (test_cuda_host_shim_semiconv.py) and the Numba CUDA
simulator (numba_cuda_simulator_semiconv_checks.py). CuPy is imported inside the tests."""

from __future__ import annotations

import numpy as np
import pytest

import pydeform
from reference import semiconv as ref
from tests.semiconv_checks import check_all_ops, embedding_case

pytestmark = pytest.mark.gpu

BACKENDS = pytest.mark.parametrize("backend", [None, "numba"], ids=["cupy", "numba"])


@BACKENDS
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_ops_match_reference(backend, dtype):
    import cupy

    from pydeform.backends import semiconv_kernels
    from tests.semiconv_checks import ops_running

    with ops_running(semiconv_kernels("cupy", backend or "cupy")):
        check_all_ops(np.random.default_rng(0), dtype, xp=cupy, to_host=cupy.asnumpy)


@BACKENDS
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_accumulate_in_float32(backend, dtype):
    import cupy
    import ml_dtypes

    storage = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    psi, labels, K = embedding_case(np.random.default_rng(1), np.float32, height=16, width=16)
    psi = psi.astype(storage).astype(np.float32)  # values the half type holds exactly
    d_psi, d_labels = cupy.asarray(psi.astype(storage)), cupy.asarray(labels)
    loss = pydeform.instance_mean_loss(d_psi, d_labels, K, "none", coordinates=True, backend=backend)
    expected = ref.instance_mean_loss(psi, labels, K, "none", coordinates=True)
    np.testing.assert_allclose(cupy.asnumpy(loss).astype(np.float64), expected, atol=2e-2 * max(1, np.abs(expected).max()))
    grad = pydeform.instance_mean_loss_backward(1.0, d_psi, d_labels, K, coordinates=True, backend=backend)
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64),
                               ref.instance_mean_loss_backward(1.0, psi, labels, K, coordinates=True), atol=2e-2)
    assert loss.dtype == grad.dtype == storage


@BACKENDS
def test_reductions_are_bit_identical_across_runs(backend):
    import cupy

    rng = np.random.default_rng(2)
    psi = cupy.asarray(rng.normal(size=(4, 8, 64, 64)).astype(np.float32))
    labels = cupy.asarray(rng.integers(0, 9, size=(4, 64, 64)))
    centers = cupy.asarray(rng.normal(size=(4, 8, 8)).astype(np.float32))

    def run():
        return [pydeform.instance_mean_loss(psi, labels, 8, "none", backend=backend),
                pydeform.instance_mean_loss_backward(1.0, psi, labels, 8, coordinates=True, backend=backend),
                *pydeform.affinity_backward(cupy.ones((4, 8, 64, 64), np.float32), psi, centers, 0.9, backend=backend)]

    for a, b in zip(run(), run()):
        assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()
