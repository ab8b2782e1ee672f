"""The invariants of the semi-convolutional ops on every backend (loss 0 for psi constant per
instance, a constant added to psi changes nothing, affinity 1 at the centre), NaN kept to its
instance, two runs bit-identical, inputs unchanged, and a hand-built ideal displacement field
recovering the ground-truth labels through the voting ops: on the Numba CPU kernels, on the CUDA
C kernels through the host shim (one thread, and threaded blocks), and, gpu-marked, on a real GPU
with both GPU kernel sets (the Numba CUDA kernels run them in the simulator,
numba_cuda_simulator_semiconv_checks.py). Also hypothesis-drawn shapes against the reference through
the host shim and on a real GPU."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydeform import centernet as centernet_module
from tests import host_shim
from tests.semiconv_checks import (
    check_all_ops,
    check_ideal_displacements_recover_labels,
    check_invariants,
    ops_running,
)

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
needs_compiler = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")


def shim_kernels(threaded):
    """(semiconv, centernet) host-shim kernel sets: one thread, or 3 blocks of 7 threads."""
    if threaded:
        return host_shim.HostShimBlocksSemiConvKernels(3, 7), host_shim.HostShimBlocksCenterNetKernels(3, 7, 5)
    return host_shim.HostShimSemiConvKernels(), host_shim.HostShimCenterNetKernels()


def voting_ops_running(semiconv_kernels, centernet_kernels):
    """The semi-convolutional ops and hough_peaks' CenterNet decode, for NumPy arrays, run these kernel sets."""
    patch = mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: centernet_kernels)
    return ops_running(semiconv_kernels), patch


@DTYPES
def test_numba_cpu(dtype):
    check_invariants(dtype)
    check_ideal_displacements_recover_labels()


@needs_compiler
@DTYPES
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "blocks-3x7"])
def test_host_shim(dtype, threaded):
    semiconv, centernet = voting_ops_running(*shim_kernels(threaded))
    with semiconv, centernet:
        check_invariants(dtype)
        check_ideal_displacements_recover_labels()


@needs_compiler
@settings(max_examples=10)
@given(st.integers(1, 2), st.integers(2, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_host_shim_matches_reference_on_drawn_shapes(n, dims, height, width, K, dtype, seed):
    with ops_running(host_shim.HostShimSemiConvKernels()):
        check_all_ops(np.random.default_rng(seed), dtype, n=n, dims=dims, height=height, width=width, K=K)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@DTYPES
def test_gpu(backend, dtype):
    import cupy

    from pydeform.backends import centernet_kernels, semiconv_kernels

    semiconv, centernet = voting_ops_running(semiconv_kernels("cupy", backend), centernet_kernels("cupy", backend))
    with semiconv, centernet:
        check_invariants(dtype, xp=cupy, to_host=cupy.asnumpy)
        check_ideal_displacements_recover_labels(xp=cupy, to_host=cupy.asnumpy)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@settings(max_examples=10)
@given(st.integers(1, 2), st.integers(2, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_gpu_matches_reference_on_drawn_shapes(backend, n, dims, height, width, K, dtype, seed):
    import cupy

    from pydeform.backends import semiconv_kernels

    with ops_running(semiconv_kernels("cupy", backend)):
        check_all_ops(np.random.default_rng(seed), dtype, cupy, cupy.asnumpy, n=n, dims=dims, height=height,
                      width=width, K=K)
