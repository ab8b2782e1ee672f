"""The CuPy RawKernel sources of CenterNet (centernet.cu), run on the CPU through the host shim
(tests/host_shim.py), against the float64 reference in float32 and float64.

Two shim models run them: the one-thread block (the public ops patched to the shim's kernel set,
so argument checks and allocation run around the CUDA code as on a GPU), and real multi-threaded
blocks (several OS threads per block meeting at __syncthreads on a barrier, several blocks), which
exercises the decode's block scan and bitonic sort and the focal loss's block reductions with
concurrent threads, odd thread counts included. Decode tiles far smaller than the GPU's make
every small heatmap span many tiles, so the candidate lists and the rank search across them are
exercised; the kernel sets are also called directly with NaN-poisoned outputs
(tests/centernet_cases.py).
"""

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from pydeform import _workspace
from pydeform import centernet as centernet_module
from pydeform.backends.cupy_kernels import centernet as cupy_centernet
from tests import host_shim
from tests.centernet_cases import (
    DecodeCase,
    assert_centres_match,
    assert_detections_match,
    assert_focal_matches,
    assert_targets_match,
    build_decode_case,
    build_focal_case,
    build_targets_case,
    check_decode_kernel,
    check_focal_kernels,
    check_targets_kernel,
    decode_cases,
    targets_cases,
)

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
# Decode tiles: one element, odd small sizes, and the GPU's.
TILES = (1, 5, 16, cupy_centernet.DECODE_TILE)
# (grid, block) of the threaded shim: odd and power-of-two thread counts, more tiles than blocks.
BLOCK_SHAPES = pytest.mark.parametrize("grid, block", [(1, 2), (3, 7), (2, 32)], ids=["1x2", "3x7", "2x32"])


def one_thread(tile=cupy_centernet.DECODE_TILE):
    return host_shim.HostShimCenterNetKernels(tile)


def shim_ops(kernels):
    """The public CenterNet ops, for NumPy arrays, run ``kernels``."""
    return mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: kernels)


def assert_decode_matches(case, kernels):
    before = case.map_arrays(np.copy)
    with shim_ops(kernels):
        got = case.run(pydeform)
    expected = case.reference()
    assert_detections_match(got, expected, case.heat.dtype)
    if case.reg is None:
        assert_centres_match(got, expected, case.down_ratio)
    for name in ("heat", "wh", "reg"):
        np.testing.assert_array_equal(getattr(case, name), getattr(before, name), err_msg=f"{name} was modified")


@DTYPES
@settings(max_examples=20)
@given(data=st.data(), tile=st.sampled_from(TILES))
def test_decode_matches_reference(dtype, data, tile):
    assert_decode_matches(data.draw(decode_cases(dtype)), one_thread(tile))


@DTYPES
@BLOCK_SHAPES
@settings(max_examples=8)
@given(data=st.data(), tile=st.sampled_from(TILES))
def test_decode_with_threaded_blocks_matches_reference(dtype, grid, block, data, tile):
    kernels = host_shim.HostShimBlocksCenterNetKernels(grid, block, tile)
    assert_decode_matches(data.draw(decode_cases(dtype)), kernels)


@pytest.mark.parametrize("K, tile", [(1, 1), (7, 4), (40, 9), (100, 16), (130, 64), (300, 2048)])
def test_decode_kernel_writes_every_element(K, tile):
    """K below, within and beyond a tile, and beyond C*H*W (= 120)."""
    case = build_decode_case(np.random.default_rng(K), np.float64, 2, 3, (5, 8), K, nan_fraction=0.1,
                             cat_spec_wh=True, threshold=0.5)
    check_decode_kernel(one_thread(tile), case)
    check_decode_kernel(host_shim.HostShimBlocksCenterNetKernels(3, 7, tile), case)


@pytest.mark.parametrize("tile", [3, 16, 2048])
@pytest.mark.parametrize("K", [5, 40, 200])
def test_equal_scores_across_tiles_keep_index_order(tile, K):
    """A constant heatmap: every pixel is a peak of the same score, so the detections are the
    first K flat indices, each tile's candidates interleaved only by index."""
    heat = np.full((2, 3, 6, 7), 0.5, dtype=np.float32)
    rng = np.random.default_rng(0)
    case = DecodeCase(heat, rng.uniform(1, 4, (2, 2, 6, 7)).astype(np.float32), None, K)
    with shim_ops(host_shim.HostShimBlocksCenterNetKernels(2, 5, tile)):
        got = case.run(pydeform)
    count = min(K, heat[0].size)
    np.testing.assert_array_equal(got[:, :count, 5], np.broadcast_to(np.arange(count) // 42, (2, count)))
    assert_detections_match(got, case.reference(), np.float32)


@DTYPES
@pytest.mark.parametrize("tile", [4, 2048])
def test_signed_zero_negative_and_infinite_peaks(dtype, tile):
    """-0 peaks tie with the zeros of non-peaks, negative peaks rank below every zero, +inf first,
    a -inf pixel among -inf / NaN neighbours is a peak of score -inf."""
    heat = np.array([
        [-0.0, -1.0, -1.0, 0.25, np.inf],
        [-1.0, -2.0, -3.0, -1.0, 0.125],
        [-np.inf, np.nan, -0.5, -0.75, -0.0],
        [-np.inf, -np.inf, -0.5, -4.0, -5.0],
    ], dtype=dtype)[None, None]
    heat = np.concatenate([heat, -heat], axis=1)
    wh = np.ones((1, 2, 4, 5), dtype=dtype)
    for K in (3, 12, 40, 45):
        case = DecodeCase(heat, wh, None, K)
        assert_decode_matches(case, one_thread(tile))
        assert_decode_matches(case, host_shim.HostShimBlocksCenterNetKernels(2, 3, tile))


@DTYPES
def test_decode_of_a_map_larger_than_a_tile(dtype):
    """The GPU's tile on a 4 x 20 x 30 map (2400 scores, two tiles per image) of random scores
    (many peaks), K inside the first tile, past it, and past C*H*W; and deterministic."""
    rng = np.random.default_rng(7)
    heat = rng.random((2, 4, 20, 30)).astype(dtype)
    wh = rng.uniform(1, 9, (2, 2, 20, 30)).astype(dtype)
    reg = rng.random((2, 2, 20, 30)).astype(dtype)
    for K in (100, 2100, 2500):
        case = DecodeCase(heat, wh, reg, K, down_ratio=4.0)
        with shim_ops(one_thread()):
            first = case.run(pydeform)
            np.testing.assert_array_equal(case.run(pydeform), first)
        assert_detections_match(first, case.reference(), dtype)
    check_decode_kernel(host_shim.HostShimBlocksCenterNetKernels(3, 32, cupy_centernet.DECODE_TILE),
                        DecodeCase(heat, wh, reg, 150))


def selection_cases():
    """Decodes that take each path of the per-image selection (centernet_decode_detections)."""
    rng = np.random.default_rng(11)
    wh = rng.uniform(1, 5, (1, 2, 42, 50)).astype(np.float32)
    # 2100 one-element tiles: more lists than the sample holds, so only the first 2048 are sampled.
    sampled_subset = (DecodeCase(rng.random((1, 1, 42, 50)).astype(np.float32), wh, None, 50), 1)
    # Scores falling with the flat index, every pixel a peak (kernel 1), 64-element tiles: the
    # winners all sit in the first lists, the sample (3 per list) bounds at index 4225, and the
    # 4226 entries not below the bound overflow the survivor arrays: the rank-counting path.
    falling = np.linspace(1.0, 0.1, 200 * 200, dtype=np.float32).reshape(1, 1, 200, 200)
    overflow = (DecodeCase(falling, np.ones((1, 2, 200, 200), np.float32), None, 200, kernel=1), 64)
    return {"sampled-subset": sampled_subset, "survivor-overflow": overflow}


@pytest.mark.parametrize("name", selection_cases().keys())
def test_decode_selection_paths(name):
    case, tile = selection_cases()[name]
    assert_decode_matches(case, one_thread(tile))
    assert_decode_matches(case, host_shim.HostShimBlocksCenterNetKernels(2, 4, tile))


class CountingShim(host_shim.HostShimCenterNetKernels):
    """The one-thread shim kernel set, recording each launch's kernel and block count."""

    def __init__(self, tile):
        super().__init__(tile)
        self.launches = []

    def _launch(self, storage_dtype, template, n_blocks, args):
        self.launches.append((template, n_blocks))
        super()._launch(storage_dtype, template, n_blocks, args)


def test_decode_is_two_launches():
    """The CPU twin of the GPU launch count: the decode's kernel set launches the tile kernel once
    (a block per tile of each image) and the selection once (a block per image), whatever K."""
    case = build_decode_case(np.random.default_rng(13), np.float32, 2, 3, (6, 7), 40)
    for K in (1, 40, 200):
        kernels = CountingShim(16)
        with shim_ops(kernels):
            dataclasses.replace(case, K=K).run(pydeform)
        assert kernels.launches == [("centernet_decode_candidates", 2 * 8), ("centernet_decode_detections", 2)]


def test_decode_scratch_is_the_candidate_lists_only():
    """No sorted copy of the heatmap: the decode's only scratch is the tile lists, min(K, tile)
    entries per tile (K = 100 of 2048-score tiles: 1/20 of the heatmap's scores)."""
    rng = np.random.default_rng(14)
    case = DecodeCase(rng.random((2, 5, 30, 40)).astype(np.float32), np.ones((2, 2, 30, 40), np.float32), None, 100)
    requested = []
    real_scratch = cupy_centernet.scratch

    def recording_scratch(xp, slot, shape, dtype):
        requested.append((slot, tuple(shape), np.dtype(dtype)))
        return real_scratch(xp, slot, shape, dtype)

    with mock.patch.object(cupy_centernet, "scratch", recording_scratch), shim_ops(one_thread()):
        case.run(pydeform)
    tiles = -(-5 * 30 * 40 // cupy_centernet.DECODE_TILE)
    assert requested == [("centernet_candidate_scores", (2, tiles, 100), np.dtype(np.float32)),
                         ("centernet_candidate_indices", (2, tiles, 100), np.dtype(np.int32))]


def test_decode_tile_must_fit_the_shared_arrays():
    for tile in (0, cupy_centernet.DECODE_TILE + 1):
        with pytest.raises(ValueError, match="decode_tile"):
            cupy_centernet.CupyCenterNetKernels(tile)


@DTYPES
@settings(max_examples=20)
@given(data=st.data())
def test_targets_match_reference(dtype, data):
    case = data.draw(targets_cases(dtype))
    boxes = case.boxes.copy()
    with shim_ops(one_thread()):
        got = case.run(pydeform)
    assert_targets_match(got, case.reference(), dtype)
    np.testing.assert_array_equal(case.boxes, boxes, err_msg="boxes were modified")


@DTYPES
@BLOCK_SHAPES
def test_targets_kernel(dtype, grid, block):
    """Overlapping objects of one class in concurrent threads: the atomic maximum."""
    case = build_targets_case(np.random.default_rng(5), dtype, batch=2, objects=9, num_classes=2,
                              output_size=(12, 10), max_objects=7)
    check_targets_kernel(one_thread(), case)
    check_targets_kernel(host_shim.HostShimBlocksCenterNetKernels(grid, block, 16), case)


@DTYPES
@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([2.0, 1.0]), beta=st.sampled_from([4.0, 2.0]),
       positives=st.integers(0, 4), shape=st.sampled_from([(2, 3, 4, 5), (1, 1, 1, 1), (1, 2, 70, 90)]))
def test_focal_loss_matches_reference(dtype, seed, alpha, beta, positives, shape):
    """(1, 2, 70, 90) has 12600 elements: several block partial sums."""
    case = build_focal_case(np.random.default_rng(seed), dtype, shape, positives=positives, alpha=alpha, beta=beta)
    before = case.map_arrays(np.copy)
    with shim_ops(one_thread()):
        loss, grad = case.loss(pydeform), case.grad(pydeform)
    assert_focal_matches(loss, grad, case, dtype)
    np.testing.assert_array_equal(case.pred, before.pred)
    np.testing.assert_array_equal(case.target, before.target)


@DTYPES
@BLOCK_SHAPES
def test_focal_kernels_write_every_element(dtype, grid, block):
    case = build_focal_case(np.random.default_rng(9), dtype, (2, 2, 70, 70))
    check_focal_kernels(one_thread(), case)
    check_focal_kernels(host_shim.HostShimBlocksCenterNetKernels(grid, block, 16), case)


def test_focal_loss_is_deterministic():
    """The same partial sums in the same order on every run, with concurrent threads too."""
    case = build_focal_case(np.random.default_rng(10), np.float32, (2, 3, 64, 64))
    for kernels in (one_thread(), host_shim.HostShimBlocksCenterNetKernels(3, 7, 16)):
        with shim_ops(kernels):
            losses = {case.loss(pydeform).tobytes() for _ in range(3)}
            grads = {case.grad(pydeform).tobytes() for _ in range(2)}
        assert len(losses) == 1 and len(grads) == 1


def test_focal_loss_parts_are_bounded():
    items = cupy_centernet.FOCAL_LOSS_PART_ITEMS
    assert cupy_centernet.focal_loss_parts(1) == 1
    assert cupy_centernet.focal_loss_parts(items) == 1
    assert cupy_centernet.focal_loss_parts(items + 1) == 2
    assert cupy_centernet.focal_loss_parts(10**12) == cupy_centernet.FOCAL_LOSS_MAX_PARTS



@DTYPES
def test_focal_loss_of_a_nan_prediction_is_nan(dtype):
    """The clamp passes NaN through (torch.clamp, the reference); its gradient is 0 there."""
    case = build_focal_case(np.random.default_rng(12), dtype)
    case.pred.reshape(-1)[5] = np.nan
    with shim_ops(one_thread()):
        loss, grad = case.loss(pydeform), case.grad(pydeform)
    assert np.isnan(loss)
    assert grad.reshape(-1)[5] == 0 and np.isfinite(grad).all()


def _planned_buffers(kernels, params, dtype, **options):
    """NaN-filled buffers for centernet_workspace's outputs and scratch (NaN: an unwritten element shows)."""
    outputs, work = centernet_module.centernet_workspace(kernels, params, dtype, **options)
    return outputs, work, {slot: np.full(shape, np.nan if np.dtype(kind).kind == "f" else 7, kind)
                           for slot, (shape, kind) in {**outputs, **work}.items()}


def _recording_scratch(requested):
    real_scratch = cupy_centernet.scratch

    def recording_scratch(xp, slot, shape, dtype):
        requested[slot] = (tuple(shape), np.dtype(dtype))
        return real_scratch(xp, slot, shape, dtype)

    return mock.patch.object(cupy_centernet, "scratch", recording_scratch)


@pytest.mark.parametrize("tile, K, size", [(1, 3, (2, 3)), (5, 40, (5, 8)), (16, 7, (6, 7)), (2048, 100, (30, 40))])
def test_decode_runs_on_exactly_the_planned_buffers(tile, K, size):
    """Under provided buffers (an unplanned or too small slot raises) the CuPy decode requests
    exactly its kernel set's decode_workspace and writes the detections into the provided output."""
    case = build_decode_case(np.random.default_rng(K), np.float32, 2, 3, size, K)
    kernels = one_thread(tile)
    with shim_ops(kernels):
        expected = case.run(pydeform)
    _, work, buffers = _planned_buffers(kernels, case.params(), np.float32)
    requested = {}
    with shim_ops(kernels), _recording_scratch(requested), _workspace.provided(buffers):
        got = case.run(pydeform)
    assert requested == {slot: (shape, np.dtype(kind)) for slot, (shape, kind) in work.items()}
    assert np.shares_memory(got, buffers["output"])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 70, 90)], ids=["one part", "several parts"])
def test_focal_loss_runs_on_exactly_the_planned_buffers(shape):
    case = build_focal_case(np.random.default_rng(15), np.float32, shape)
    kernels = one_thread()
    with shim_ops(kernels):
        expected_loss, expected_grad = case.loss(pydeform), case.grad(pydeform)
    for backward, expected in ((False, expected_loss), (True, expected_grad)):
        _, work, buffers = _planned_buffers(kernels, case.params(), np.float32, shape=shape, backward=backward)
        requested = {}
        with shim_ops(kernels), _recording_scratch(requested), _workspace.provided(buffers):
            got = (case.grad if backward else case.loss)(pydeform)
        assert requested == {slot: (tuple(s), np.dtype(kind)) for slot, (s, kind) in work.items()
                             if slot != centernet_module.FOCAL_SUMS_SLOT}
        assert np.shares_memory(got, buffers["grad_pred" if backward else "output"])
        np.testing.assert_array_equal(got, expected)
    assert work["centernet_focal_partials"][0] == (cupy_centernet.focal_loss_parts(case.pred.size), 3)


def test_an_unplanned_candidate_list_is_refused():
    case = build_decode_case(np.random.default_rng(16), np.float32, 1, 2, (4, 4), 5)
    _, _, buffers = _planned_buffers(one_thread(4), case.params(), np.float32)
    del buffers["centernet_candidate_indices"]
    with shim_ops(one_thread(4)), _workspace.provided(buffers):
        with pytest.raises(RuntimeError, match="no buffer provided for slot 'centernet_candidate_indices'"):
            case.run(pydeform)
