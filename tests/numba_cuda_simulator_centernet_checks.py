"""The Numba CUDA CenterNet kernels run by Numba's CUDA simulator on host arrays.

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1``. Every CUDA thread is a Python thread, so
the shapes are tiny; small decode chunks give several candidate heaps per image and so exercise
the merge.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

import pydeform
from pydeform import centernet as centernet_module
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels.centernet import NumbaCudaCenterNetKernels
from tests.centernet_cases import (
    assert_detections_match,
    assert_focal_matches,
    assert_targets_match,
    build_decode_case,
    build_focal_case,
    build_targets_case,
    check_decode_kernel,
    check_focal_kernels,
    check_targets_kernel,
    overlapping_targets_case,
)

if not simulator_enabled():
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_numba_cuda_simulator.py)")

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])

DECODE_PROBLEMS = {
    "reg-threshold-chunk5": dict(K=6, chunk=5, threshold=0.5),
    "cat-spec-wh-no-reg-chunk3": dict(K=4, chunk=3, with_reg=False, cat_spec_wh=True, kernel=1),
    "K-beyond-scores-chunk7": dict(K=27, chunk=7, kernel=5, down_ratio=4.0),
    "one-chunk": dict(K=5, chunk=1024),
    "default-chunk": dict(K=5, chunk=None),
}


def decode_problem(name, dtype):
    options = dict(DECODE_PROBLEMS[name])
    chunk = options.pop("chunk")
    case = build_decode_case(np.random.default_rng(len(name)), dtype, 2, 2, (3, 4), nan_fraction=0.1, **options)
    return case, NumbaCudaCenterNetKernels(xp=np, chunk=chunk)


def simulated(kernels):
    return mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: kernels)


@DTYPES
@pytest.mark.parametrize("name", DECODE_PROBLEMS)
def test_simulated_decode_matches_reference(name, dtype):
    case, kernels = decode_problem(name, dtype)
    with simulated(kernels):
        got = case.run(pydeform)
    assert_detections_match(got, case.reference(), dtype)
    check_decode_kernel(kernels, case)


@pytest.mark.parametrize("name", DECODE_PROBLEMS)
def test_simulated_decode_in_float16(name):
    """float16 heat (converted to float32 around the launch; the op takes float16 on the GPU only)."""
    check_decode_kernel(*reversed(decode_problem(name, np.float16)))


@DTYPES
def test_simulated_targets_match_reference(dtype):
    case = build_targets_case(np.random.default_rng(3), dtype, batch=2, objects=4, output_size=(6, 7), max_objects=3)
    kernels = NumbaCudaCenterNetKernels(xp=np)
    with simulated(kernels):
        got = case.run(pydeform)
    assert_targets_match(got, case.reference(), dtype)
    check_targets_kernel(kernels, case)
    check_targets_kernel(kernels, overlapping_targets_case(dtype))


@DTYPES
def test_simulated_focal_loss_matches_reference(dtype):
    case = build_focal_case(np.random.default_rng(4), dtype, (1, 2, 3, 4), positives=2)
    kernels = NumbaCudaCenterNetKernels(xp=np)
    with simulated(kernels):
        assert_focal_matches(case.loss(pydeform), case.grad(pydeform), case, dtype)
    check_focal_kernels(kernels, case)


def test_simulated_focal_loss_in_float16():
    check_focal_kernels(NumbaCudaCenterNetKernels(xp=np), build_focal_case(np.random.default_rng(5), np.float16,
                                                                           (1, 2, 3, 4), positives=2))
