"""The Numba CUDA semi-convolutional kernels run by Numba's CUDA simulator on host arrays.

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1``. Every CUDA thread is a Python thread, so
the shapes are tiny.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydeform import centernet as centernet_module
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels.centernet import NumbaCudaCenterNetKernels
from pydeform.backends.numba_kernels.semiconv import NumbaCudaSemiConvKernels
from tests.semiconv_checks import (
    check_all_ops,
    check_ideal_displacements_recover_labels,
    check_invariants,
    check_votes_round_half_away,
    ops_running,
)

if not simulator_enabled():
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_numba_cuda_simulator.py)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_ops_match_reference(dtype):
    with ops_running(NumbaCudaSemiConvKernels(xp=np)):
        check_all_ops(np.random.default_rng(0), dtype)


# The simulated threads compute -inf - (-inf) (a softmax over -inf scores) outside the checks'
# np.errstate, which is per thread.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_invariants_determinism_and_unchanged_inputs(dtype):
    with ops_running(NumbaCudaSemiConvKernels(xp=np)):
        check_invariants(dtype)


def test_ideal_displacements_recover_the_labels_through_the_voting_ops():
    kernels = NumbaCudaCenterNetKernels(xp=np)
    with ops_running(NumbaCudaSemiConvKernels(xp=np)), \
            mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: kernels):
        check_ideal_displacements_recover_labels()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_votes_round_half_away_exactly(dtype):
    with ops_running(NumbaCudaSemiConvKernels(xp=np)):
        check_votes_round_half_away(dtype)


@settings(max_examples=4)
@given(st.integers(1, 2), st.integers(2, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_ops_match_reference_on_drawn_shapes(n, dims, height, width, K, dtype, seed):
    with ops_running(NumbaCudaSemiConvKernels(xp=np)):
        check_all_ops(np.random.default_rng(seed), dtype, n=n, dims=dims, height=height, width=width, K=K)
