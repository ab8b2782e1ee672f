"""``hough_votes`` rounds half away from zero exactly, also for the values just below a half
where ``floor(v + 0.5)`` rounds the sum up (the float just below 0.5 gives 1 that way, not 0),
against an exact decimal rounding: on the reference, the Numba CPU kernels, the CUDA C kernels
through the host shim and, gpu-marked, both GPU kernel sets (the Numba CUDA kernels run
``check_votes_round_half_away`` in the simulator, numba_cuda_simulator_semiconv_checks.py)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from reference import semiconv as ref
from tests import host_shim
from tests.semiconv_checks import check_votes_round_half_away, ops_running

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


@DTYPES
def test_reference(dtype):
    check_votes_round_half_away(dtype, ref.hough_votes)


@DTYPES
@pytest.mark.parametrize("kernels", ["numba-cpu", "host-shim"])
def test_ops(dtype, kernels):
    if kernels == "host-shim" and not host_shim.compiler_available():
        pytest.skip("needs g++")
    with ops_running(host_shim.HostShimSemiConvKernels()) if kernels == "host-shim" else contextlib.nullcontext():
        check_votes_round_half_away(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@DTYPES
def test_gpu(backend, dtype):
    import cupy

    from pydeform.backends import semiconv_kernels

    with ops_running(semiconv_kernels("cupy", backend)):
        check_votes_round_half_away(dtype, xp=cupy, to_host=cupy.asnumpy)
