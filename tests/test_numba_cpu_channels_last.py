"""The Numba CPU forwards that read a channels-last copy of the input (plain roi_align and
roi_pool, one task per row of bins) against the per-element forward they replace, which reads
the input as it is: the same samples, order and arithmetic, so the outputs must be equal to the
bit, NaN inputs, ties, empty and outside bins and bad batch indices included. And the copy
itself."""

from __future__ import annotations

import numpy as np
import pytest

from pydeform.backends.numba_kernels.layout import channels_last
from pydeform.backends.numba_kernels.roi import NumbaCpuRoIKernels, _shape, cpu_kernels
from pydeform.backends.numba_kernels.targets import flat
from pydeform.roi import RoIAlignParams, RoIPoolParams

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_channels_last_is_the_transposed_copy(dtype):
    input = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(dtype)
    before = input.copy()
    copy = channels_last(input)
    assert copy.dtype == input.dtype and copy.shape == (input.size,)
    np.testing.assert_array_equal(copy, input.transpose(0, 2, 3, 1).ravel())
    np.testing.assert_array_equal(input, before)


def _feature_map(rng, dtype):
    """N=2, C=5, 9x11 with values from a small set (ties in every window) and a few NaNs."""
    input = rng.integers(-3, 4, (2, 5, 9, 11)).astype(dtype) / 2
    input[0, 1, 4, 5] = np.nan
    input[1, 3, 0, 0] = np.nan
    input[1, 4, 8, 10] = np.nan
    return input


def _rois(rng, dtype, huge=True):
    """Boxes inside, across the border and outside the image, tiny, inverted and (unless not
    ``huge``: adaptive sampling would take ~1e11 samples per bin) huge, and two with a batch
    index outside [0, N) (validated away by the op, kept here: the kernels must give 0 for
    them)."""
    boxes = [
        [0, 2.0, 3.0, 30.0, 25.0], [1, -10.0, -6.0, 12.0, 40.0], [0, 50.0, 2.0, 70.0, 30.0],
        [1, 9.0, 9.0, 9.5, 9.2], [0, 20.0, 20.0, 5.0, 4.0], [1, -40.0, -40.0, 80.0, 80.0],
        [0, 40.0, 30.0, 80.0, 60.0], [5, 2.0, 2.0, 20.0, 20.0], [-1, 2.0, 2.0, 20.0, 20.0],
    ]
    if huge:
        boxes.append([1, -1e6, -1e6, 1e6, 1e6])
    random = np.column_stack([rng.integers(0, 2, 12), rng.uniform(-8, 48, (12, 2)), rng.uniform(-8, 48, (12, 2))])
    return np.concatenate([np.array(boxes), random]).astype(dtype)


def _both_forwards(family, input, rois, params, pooled):
    """(per-element forward, shared-bin forward) outputs for the same call."""
    output_shape = (rois.shape[0], params.channels_out, pooled, pooled)
    shape = _shape(input, np.empty(output_shape))
    kernels = cpu_kernels(family)
    per_element = np.full(output_shape, -7.0, input.dtype)
    stand_ins = NumbaCpuRoIKernels()._stand_ins((None, None), input)
    kernels.forward(flat(input), flat(rois), *stand_ins, flat(per_element), shape, tuple(params), per_element.size)
    shared = np.full(output_shape, -7.0, input.dtype)
    kernels.shared_bin_forward(channels_last(input), flat(rois), flat(shared), shape, tuple(params),
                               rois.shape[0] * pooled)
    return per_element, shared


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_mode", [False, True], ids=["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["sampling2", "adaptive"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_roi_align_shared_bins_equal_the_per_element_forward(dtype, max_mode, sampling_ratio, aligned):
    rng = np.random.default_rng(1)
    input = _feature_map(rng, dtype)
    rois = _rois(rng, dtype, huge=sampling_ratio > 0)
    n, channels, height, width = input.shape
    params = RoIAlignParams(channels, height, width, 3, 3, channels, 0.5, sampling_ratio, aligned, max_mode, False)
    per_element, shared = _both_forwards("roi_align", input, rois, params, 3)
    np.testing.assert_array_equal(shared, per_element)
    # The case is not degenerate: many bins read the image, and an average reads a NaN (a
    # maximum keeps a NaN only when it is a bin's first sample).
    assert np.count_nonzero(per_element) > per_element.size // 10
    assert max_mode or np.isnan(per_element).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_roi_pool_shared_bins_equal_the_per_element_forward(dtype):
    rng = np.random.default_rng(2)
    input = _feature_map(rng, dtype)
    rois = _rois(rng, dtype)
    n, channels, height, width = input.shape
    params = RoIPoolParams(channels, height, width, 4, 4, channels, 0.5, False)
    per_element, shared = _both_forwards("roi_pool", input, rois, params, 4)
    np.testing.assert_array_equal(shared, per_element)
    assert np.isnan(per_element).any() and (per_element == 0).any() and np.count_nonzero(per_element) > 0
