"""The Numba CPU CenterNet kernels against the float64 reference: decode (scores and classes
exactly, boxes to dtype tolerance), targets and the focal loss with its gradient, through the
public ops and through the kernel set with poisoned outputs; small decode chunks make every
image span several candidate heaps."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from pydeform import centernet as centernet_module
from pydeform.backends.numba_kernels.centernet import NumbaCpuCenterNetKernels
from tests.centernet_cases import (
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
    overlapping_targets_case,
    targets_cases,
)

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


def with_chunk(chunk):
    """Patch the public ops to a CPU kernel set with ``chunk`` scores per decode task."""
    kernels = NumbaCpuCenterNetKernels(chunk)
    return mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: kernels)


@DTYPES
@settings(max_examples=15)
@given(data=st.data(), chunk=st.sampled_from([None, 1, 5, 16]))
def test_decode_matches_reference(dtype, data, chunk):
    case = data.draw(decode_cases(dtype))
    before = case.map_arrays(np.copy)
    if chunk is None:
        got = case.run(pydeform)
    else:
        with with_chunk(chunk):
            got = case.run(pydeform)
    expected = case.reference()
    assert_detections_match(got, expected, dtype)
    assert_centres_match(got, expected, case.down_ratio, case.reg)
    for name in ("heat", "wh", "reg"):
        np.testing.assert_array_equal(getattr(case, name), getattr(before, name), err_msg=f"{name} was modified")


@pytest.mark.parametrize("K, chunk", [(7, 4), (40, 9), (100, 16384), (3, 1)])
def test_decode_kernel_writes_every_element(K, chunk):
    case = build_decode_case(np.random.default_rng(K), np.float64, 2, 3, (4, 5), K, nan_fraction=0.1,
                             cat_spec_wh=True, threshold=0.5)
    check_decode_kernel(NumbaCpuCenterNetKernels(chunk), case)


@pytest.mark.parametrize("chunk", [4, 16384])
def test_decode_of_negative_scores(chunk):
    """Logits rather than probabilities: negative peaks rank below the zeros of non-peaks."""
    case = build_decode_case(np.random.default_rng(12), np.float64, 2, 3, (5, 6), 40, nan_fraction=0.05,
                             heat_offset=-1.5)
    check_decode_kernel(NumbaCpuCenterNetKernels(chunk), case)


def test_decode_of_a_large_map_uses_many_chunks_and_is_deterministic():
    # 80 classes x 24 x 24 (46080 scores, three CPU chunks per image); smooth random blobs.
    rng = np.random.default_rng(3)
    case = build_decode_case(rng, np.float32, 2, 80, (24, 24), 100)
    heat = rng.random(case.heat.shape).astype(np.float32)
    case = type(case)(heat, case.wh, case.reg, 100)
    first = case.run(pydeform)
    assert_detections_match(first, case.reference(), np.float32)
    np.testing.assert_array_equal(case.run(pydeform), first)


@DTYPES
@settings(max_examples=15)
@given(data=st.data())
def test_targets_match_reference(dtype, data):
    case = data.draw(targets_cases(dtype))
    boxes = case.boxes.copy()
    assert_targets_match(case.run(pydeform), case.reference(), dtype)
    np.testing.assert_array_equal(case.boxes, boxes, err_msg="boxes were modified")


@DTYPES
def test_targets_kernel(dtype):
    case = build_targets_case(np.random.default_rng(5), dtype, batch=2, objects=7, max_objects=5)
    check_targets_kernel(NumbaCpuCenterNetKernels(), case)
    check_targets_kernel(NumbaCpuCenterNetKernels(), overlapping_targets_case(dtype))


def test_targets_accept_any_integer_labels():
    case = build_targets_case(np.random.default_rng(6), np.float32)
    expected = case.reference()
    for dtype in (np.int32, np.int8, np.int64):
        got = pydeform.centernet_targets(case.boxes, case.labels.astype(dtype), case.num_classes, case.output_size,
                                         **case.options())
        assert_targets_match(got, expected, np.float32)


@DTYPES
@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([2.0, 1.0]), beta=st.sampled_from([4.0, 2.0]),
       positives=st.integers(0, 4), shape=st.sampled_from([(2, 3, 4, 5), (1, 1, 1, 1), (1, 2, 100, 90)]))
def test_focal_loss_matches_reference(dtype, seed, alpha, beta, positives, shape):
    case = build_focal_case(np.random.default_rng(seed), dtype, shape, positives=positives, alpha=alpha, beta=beta)
    before = case.map_arrays(np.copy)
    assert_focal_matches(case.loss(pydeform), case.grad(pydeform), case, dtype)
    np.testing.assert_array_equal(case.pred, before.pred)
    np.testing.assert_array_equal(case.target, before.target)


@DTYPES
def test_focal_kernels_write_every_element(dtype):
    check_focal_kernels(NumbaCpuCenterNetKernels(), build_focal_case(np.random.default_rng(9), dtype, (2, 2, 70, 70)))


def test_focal_loss_is_deterministic_and_empty_input_gives_zero():
    case = build_focal_case(np.random.default_rng(10), np.float32, (2, 3, 64, 64))
    losses = {float(case.loss(pydeform)) for _ in range(3)}
    assert len(losses) == 1
    empty = np.zeros((0, 2, 3, 3))
    assert float(pydeform.centernet_focal_loss(empty, empty)) == 0.0
    assert pydeform.centernet_focal_loss_backward(np.array(1.0), empty, empty).shape == (0, 2, 3, 3)


def test_grad_output_may_be_a_one_element_array():
    case = build_focal_case(np.random.default_rng(11), np.float64)
    flat = pydeform.centernet_focal_loss_backward(case.grad_output.reshape(1), case.pred, case.target)
    np.testing.assert_array_equal(flat, case.grad(pydeform))


def test_the_examples_of_docs_centernet_md():
    heat = np.array([[[[0.1, 0.9, 0.2, 0.1], [0.3, 0.4, 0.2, 0.8], [0.1, 0.2, 0.7, 0.7]]]], dtype=np.float32)
    wh = np.empty((1, 2, 3, 4), np.float32)
    wh[:, 0], wh[:, 1] = 4, 2
    np.testing.assert_allclose(pydeform.centernet_decode(heat, wh, K=3, down_ratio=4.0, threshold=0.5)[0], [
        [-2, -2, 14, 6, 0.9, 0], [6, 2, 22, 10, 0.8, 0], [-6, -2, 10, 6, 0, -1]], rtol=1e-7)
    targets = pydeform.centernet_targets(np.array([[[8.0, 4.0, 40.0, 28.0]]]), np.array([[0]]), 1, (8, 12))
    assert (targets.wh[0, 0].tolist(), targets.reg[0, 0].tolist(), int(targets.ind[0, 0])) == ([8, 6], [0, 0], 54)
    np.testing.assert_allclose(targets.heatmap[0, 0, 3:6, 5:8], np.exp(-np.array([[4, 2, 4], [2, 0, 2], [4, 2, 4]])))
    assert np.count_nonzero(targets.heatmap) == 9


def test_decode_and_focal_loss_take_their_planned_workspace():
    """Inside ``provided`` (as pydeform.jax calls the drivers) the kernel set takes exactly the
    buffers its plans name, and nothing else."""
    from pydeform._workspace import provided

    kernels = NumbaCpuCenterNetKernels(4)
    case = build_decode_case(np.random.default_rng(13), np.float64, 2, 2, (3, 5), 7)
    plan = kernels.decode_workspace(case.params(), np.dtype(np.float64))
    buffers = {slot: np.full(shape, -7, dtype) for slot, (shape, dtype) in plan.items()}
    with provided(buffers):
        check_decode_kernel(kernels, case)
    assert all((buffer != -7).any() for buffer in buffers.values())
    focal = build_focal_case(np.random.default_rng(14), np.float64, (1, 2, 90, 100))
    ((slot, (shape, dtype)),) = kernels.focal_loss_workspace(focal.pred.size, np.dtype(np.float64)).items()
    with provided({slot: np.full(shape, np.nan, dtype)}):
        check_focal_kernels(kernels, focal)
    with provided({}), pytest.raises(RuntimeError, match="no buffer provided for slot 'centernet_chunk_scores'"):
        check_decode_kernel(kernels, case)


def test_non_contiguous_inputs():
    case = build_decode_case(np.random.default_rng(15), np.float32, 2, 3, (5, 6), 9, cat_spec_wh=True)

    def strided(a):  # the same values in a non-contiguous view (every other element of a copy)
        return np.repeat(a, 2, axis=-1)[..., ::2]

    assert not strided(case.heat).flags.c_contiguous
    np.testing.assert_array_equal(case.map_arrays(strided).run(pydeform), case.run(pydeform))
    focal = build_focal_case(np.random.default_rng(16), np.float32)
    strided_focal = focal.map_arrays(lambda a: strided(a) if a.ndim == 4 else a)
    np.testing.assert_array_equal(strided_focal.grad(pydeform), focal.grad(pydeform))
    assert strided_focal.loss(pydeform) == focal.loss(pydeform)
    targets = build_targets_case(np.random.default_rng(17), np.float64)
    strided_boxes = np.repeat(targets.boxes, 2, axis=1)[:, ::2]
    got = pydeform.centernet_targets(strided_boxes, targets.labels.T.copy().T, targets.num_classes,
                                     targets.output_size, **targets.options())
    assert_targets_match(got, targets.reference(), np.float64)
