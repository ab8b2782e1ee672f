"""The CuPy RawKernel sources of the semi-convolutional ops (semiconv.cu), run on the CPU
through the host shim (tests/host_shim.py) against the float64 reference in float32 and float64:
as one thread of one block, and as real multi-threaded blocks (several OS threads per block
meeting at __syncthreads, fewer blocks than (image, instance) tasks), which exercises the block
reductions and the seed selection with concurrent threads, odd thread counts included."""

import numpy as np
import pytest

from tests import host_shim
from tests.semiconv_checks import check_all_ops, embedding_case, ops_running

import pydeform

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


@DTYPES
def test_ops_match_reference_one_thread(dtype):
    with ops_running(host_shim.HostShimSemiConvKernels()):
        check_all_ops(np.random.default_rng(0), dtype)


@pytest.mark.parametrize("grid, block", [(1, 2), (3, 7), (2, 32)], ids=["1x2", "3x7", "2x32"])
def test_ops_match_reference_threaded_blocks(grid, block):
    with ops_running(host_shim.HostShimBlocksSemiConvKernels(grid, block)):
        check_all_ops(np.random.default_rng(1), np.float64)


def test_block_reductions_are_bit_identical_across_runs():
    psi, labels, K = embedding_case(np.random.default_rng(2), np.float32, height=9, width=11)
    with ops_running(host_shim.HostShimBlocksSemiConvKernels(3, 7)):
        runs = [(pydeform.instance_mean_loss_backward(1.0, psi, labels, K, coordinates=True).tobytes(),
                 pydeform.instance_mean_loss(psi, labels, K, "none").tobytes()) for _ in range(2)]
    assert runs[0] == runs[1]
