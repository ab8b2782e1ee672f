"""The Numba CPU backend of the RoI ops (NumPy arrays) against the float64 reference.

Every op's forward and backward on drawn problems (boxes inside, across and outside the image,
zero-size, tiny, inverted and huge; both ``aligned`` values, explicit and adaptive sampling, max
and average; rois as ``[K, 5]`` rows or per-image lists); the kernel-set methods called directly
with NaN-poisoned outputs; no rois; bad batch indices that reach the kernels anyway; many
overlapping rois (the race-free CPU backward); identities between the ops.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
import reference
from pydeform.backends.numba_kernels.roi import NumbaCpuRoIKernels
from tests.roi_kernel_set_checks import (
    check_kernel_call,
    check_kernels_write_every_element,
    check_max_modes_propagate_nan,
    recorded_call,
)
from tests.strategies import (
    ROI_KINDS,
    ROI_OPS,
    RoICase,
    assert_close,
    assert_roi_grads_close,
    build_roi_case,
    roi_boxes_for,
    roi_cases,
)

DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["float64", "float32"]


def copies(case: RoICase) -> RoICase:
    return case.map_arrays(np.copy)


def assert_unchanged(case: RoICase, before: RoICase) -> None:
    previous = before.arrays()
    for name, array in case.arrays().items():
        np.testing.assert_array_equal(array, previous[name], err_msg=f"{name} was modified")


def check_forward(case: RoICase, dtype) -> np.ndarray:
    before = copies(case)
    out = case.forward(pydeform)
    assert type(out) is np.ndarray and out.dtype == np.dtype(dtype)
    assert_close("output", out, case.forward(reference), dtype)
    assert_unchanged(case, before)
    return out


def check_backward(case: RoICase, dtype) -> dict:
    before = copies(case)
    grads = case.backward(pydeform)
    for name, grad in grads.items():
        assert grad is None or (type(grad) is np.ndarray and grad.dtype == np.dtype(dtype)), name
    assert_roi_grads_close(grads, case.backward(reference), dtype)
    assert_unchanged(case, before)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ROI_OPS)
@given(data=st.data())
def test_forward_matches_reference(op, dtype, data):
    check_forward(data.draw(roi_cases(op=op, dtype=dtype)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ROI_OPS)
@given(data=st.data())
def test_backward_matches_reference(op, dtype, data):
    check_backward(data.draw(roi_cases(op=op, dtype=dtype, with_grad=True)), dtype)


@pytest.mark.parametrize("kind", ROI_KINDS)
@pytest.mark.parametrize("op", ROI_OPS)
@settings(max_examples=4)
@given(data=st.data())
def test_every_box_kind(op, kind, data):
    """Each kind of box on its own, so that none depends on what hypothesis happens to draw."""
    case = data.draw(roi_cases(op=op, with_grad=True, kinds=(kind,), max_rois=3))
    check_forward(case, np.float64)
    check_backward(case, np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_options(aligned, mode, sampling_ratio, dtype):
    case = build_roi_case("roi_align", np.random.default_rng(1), dtype, output_size=(3, 2), aligned=aligned, mode=mode,
                      sampling_ratio=sampling_ratio)
    check_forward(case, dtype)
    check_backward(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_offset", [False, True])
def test_deform_roi_pool_options(with_offset, with_mask, dtype):
    rng = np.random.default_rng(2)
    k = 2 * len(ROI_KINDS)
    case = build_roi_case(
        "deform_roi_pool", rng, dtype, output_size=(2, 3), sampling_ratio=0, gamma=0.3,
        offset=rng.standard_normal((k, 2, 2, 3)).astype(dtype) if with_offset else None,
        mask=rng.uniform(-0.5, 1.5, (k, 1, 2, 3)).astype(dtype) if with_mask else None,
    )
    check_forward(case, dtype)
    grads = check_backward(case, dtype)
    assert (grads["offset"] is None) != with_offset and (grads["mask"] is None) != with_mask


def huge_adaptive_case(op, rng) -> RoICase:
    """Boxes 40x the image with adaptive sampling: hundreds of samples per bin axis."""
    rows = np.array([[0, -300.0, -250.0, 310.0, 260.0], [1, -200.0, 0.0, 400.0, 3.0]])
    options = {"roi_align": dict(output_size=2, sampling_ratio=0, aligned=True),
               "ps_roi_align": dict(output_size=2, sampling_ratio=0),
               "deform_roi_pool": dict(output_size=2, sampling_ratio=0, offset=rng.standard_normal((2, 2, 2, 2)))}[op]
    channels = 4 if op == "ps_roi_align" else 2
    case = RoICase(op, rng.standard_normal((2, channels, 6, 5)), rows, options, None)
    return dataclasses.replace(case, grad_output=rng.standard_normal(case.forward(reference).shape))


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align", "deform_roi_pool"])
def test_huge_rois_with_adaptive_sampling(op):
    case = huge_adaptive_case(op, np.random.default_rng(3))
    check_forward(case, np.float64)
    check_backward(case, np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deform_psroi_pool_shared_cells(dtype):
    """group_size 2 < pooled_size 3 and part_size 2: several bins share a group cell (input
    channel) and a part cell (trans element); two classes."""
    rng = np.random.default_rng(4)
    k = 2 * len(ROI_KINDS)
    case = build_roi_case("deform_psroi_pool", rng, dtype, channels=8, scale=1.0, trans=rng.standard_normal(
        (k, 4, 2, 2)).astype(dtype), output_dim=2, group_size=2, pooled_size=3, part_size=2, sample_per_part=3,
        trans_std=0.2)
    check_forward(case, dtype)
    check_backward(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ROI_OPS)
@given(data=st.data())
def test_kernels_write_every_element(op, dtype, data):
    """The kernel-set methods, called directly with the arguments the op prepares."""
    check_kernels_write_every_element(NumbaCpuRoIKernels(), data.draw(roi_cases(op=op, dtype=dtype, with_grad=True,
                                                                               min_rois=1)))


@pytest.mark.parametrize("op", ROI_OPS)
def test_batch_index_outside_the_batch_reads_nothing(op):
    """Rois are validated before the kernels; a bad batch index (N, -1, NaN) that reaches them
    anyway gives 0 and no gradient, and the other rois are unaffected."""
    rng = np.random.default_rng(5)
    options = {
        "roi_align": dict(output_size=2, sampling_ratio=2), "ps_roi_align": dict(output_size=2),
        "roi_pool": dict(output_size=2), "ps_roi_pool": dict(output_size=2),
        "deform_roi_pool": dict(output_size=2, offset=rng.standard_normal((5, 2, 2, 2)),
                                mask=rng.standard_normal((5, 1, 2, 2))),
        "deform_psroi_pool": dict(trans=rng.standard_normal((5, 2, 2, 2)), group_size=2, pooled_size=2,
                                  trans_std=0.1),
    }[op]
    channels = 4 if op in ("ps_roi_align", "ps_roi_pool", "deform_psroi_pool") else 2
    rows = roi_boxes_for(rng, 2, ["inside", "straddling", "huge", "inside", "straddling"], 5, 5, 1.0, snap=False)
    case = RoICase(op, rng.standard_normal((2, channels, 5, 5)), rows, options, None)
    case = dataclasses.replace(case, grad_output=rng.standard_normal(case.forward(reference).shape))
    valid, bad = [0, 2], [1, 3, 4]
    valid_case = RoICase(op, case.input, rows[valid], {k: (v[valid] if isinstance(v, np.ndarray) else v)
                                                       for k, v in options.items()}, case.grad_output[valid])
    kernels = NumbaCpuRoIKernels()

    def with_bad_indices(args, at):
        rois = args[at].copy()  # a copy: the recorded rois may be the case's own array
        rois[bad, 0] = [2.0, -1.0, np.nan]
        return args[:at] + (rois,) + args[at + 1:]

    def per_roi(valid_rows):
        """The bad rois' rows are 0 (output; offset / mask / trans gradients)."""
        full = np.zeros((len(rows),) + valid_rows.shape[1:])
        full[valid] = valid_rows
        return full

    method, args = recorded_call(lambda: case.forward(pydeform))
    check_kernel_call(kernels, method, with_bad_indices(args, 1), per_roi(valid_case.forward(reference)))
    method, args = recorded_call(lambda: case.backward(pydeform))
    expected = {name: grad if name == "input" or grad is None else per_roi(grad)
                for name, grad in valid_case.backward(reference).items()}
    check_kernel_call(kernels, method, with_bad_indices(args, 2), expected)


@pytest.mark.parametrize("op", ROI_OPS)
@pytest.mark.parametrize("form", ["rows", "list"])
def test_no_rois(op, form):
    case = build_roi_case(op, np.random.default_rng(6), kinds=(), channels=4, **{
        "roi_align": dict(output_size=2), "ps_roi_align": dict(output_size=(2, 1)), "roi_pool": dict(output_size=2),
        "ps_roi_pool": dict(output_size=(1, 2)),
        "deform_roi_pool": dict(output_size=2, offset=np.zeros((0, 2, 2, 2)), mask=np.zeros((0, 1, 2, 2))),
        "deform_psroi_pool": dict(trans=np.zeros((0, 2, 2, 2)), group_size=2, pooled_size=2),
    }[op])
    if form == "list":
        case = dataclasses.replace(case, rois=[np.zeros((0, 4)), np.zeros((0, 4))])
    out = case.forward(pydeform)
    assert out.shape == (0,) + case.forward(reference).shape[1:] and out.dtype == np.float64
    grads = case.backward(pydeform)
    for name, grad in grads.items():
        expected = case.input if name == "input" else case.options[name]
        assert grad.shape == expected.shape and not grad.any(), name


@pytest.mark.parametrize("op", ROI_OPS)
def test_rois_as_a_list_with_an_empty_image(op):
    """Per-image [L, 4] boxes (image 1 has none) give what the equivalent [K, 5] rows give."""
    rng = np.random.default_rng(7)
    case = build_roi_case(op, rng, n=3, channels=4, kinds=("inside", "straddling", "huge", "tiny"), **{
        "roi_align": dict(output_size=2, mode="max"), "ps_roi_align": dict(output_size=(2, 1)),
        "roi_pool": dict(output_size=2), "ps_roi_pool": dict(output_size=(1, 2)),
        "deform_roi_pool": dict(output_size=2, offset=rng.standard_normal((4, 2, 2, 2))),
        "deform_psroi_pool": dict(trans=rng.standard_normal((4, 2, 2, 2)), group_size=2, pooled_size=2,
                                  trans_std=0.3),
    }[op])
    rows = case.rois.copy()
    rows[:, 0] = [0, 0, 2, 2]
    as_rows = dataclasses.replace(case, rois=rows)
    as_list = dataclasses.replace(case, rois=[rows[:2, 1:], np.zeros((0, 4)), rows[2:, 1:]])
    np.testing.assert_array_equal(as_list.forward(pydeform), as_rows.forward(pydeform))
    check_forward(as_list, np.float64)
    check_backward(as_list, np.float64)


@pytest.mark.parametrize("op", ROI_OPS)
def test_many_overlapping_rois(op):
    """Forty nearly identical rois on one image: every bin of every roi scatters into the same
    pixels, which a racy CPU backward would lose updates on."""
    rng = np.random.default_rng(8)
    k = 40
    rows = np.column_stack([np.zeros(k), np.array([0.5, 1.0, 6.5, 5.0]) + rng.uniform(-0.3, 0.3, (k, 4))])
    options = {
        "roi_align": dict(output_size=3, sampling_ratio=2), "ps_roi_align": dict(output_size=2, sampling_ratio=2),
        "roi_pool": dict(output_size=3), "ps_roi_pool": dict(output_size=2),
        "deform_roi_pool": dict(output_size=3, offset=rng.standard_normal((k, 2, 3, 3)),
                                mask=rng.standard_normal((k, 1, 3, 3))),
        "deform_psroi_pool": dict(trans=rng.standard_normal((k, 2, 2, 2)), group_size=2, pooled_size=2,
                                  sample_per_part=2, trans_std=0.2),
    }[op]
    channels = 8 if op in ("ps_roi_align", "ps_roi_pool", "deform_psroi_pool") else 3
    case = RoICase(op, rng.standard_normal((2, channels, 7, 8)), rows, options, None)
    case = dataclasses.replace(case, grad_output=rng.standard_normal(case.forward(reference).shape))
    check_backward(case, np.float64)


@given(case=roi_cases(op="deform_roi_pool", with_grad=True))
def test_deform_roi_pool_without_offset_is_aligned_roi_align(case):
    """Zero (or no) offsets and no mask: deform_roi_pool is roi_align(aligned=True) with the same
    sampling ratio, forward and input gradient, to the bit."""
    options = dict(case.options, mask=None, offset=None if case.options["offset"] is None else
                   np.zeros_like(case.options["offset"]))
    plain = dataclasses.replace(case, options=options)
    o = case.options
    align = RoICase("roi_align", case.input, case.rois,
                    dict(output_size=o["output_size"], spatial_scale=o["spatial_scale"],
                         sampling_ratio=o["sampling_ratio"], aligned=True), case.grad_output)
    np.testing.assert_array_equal(plain.forward(pydeform), align.forward(pydeform))
    np.testing.assert_array_equal(plain.backward(pydeform)["input"], align.backward(pydeform)["input"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(data=st.data())
def test_deform_roi_pool_mask_scales_the_output(dtype, data):
    case = data.draw(roi_cases(op="deform_roi_pool", dtype=dtype))
    mask = np.random.default_rng(9).uniform(-1, 2, (case.rois_as_rows.shape[0], 1) + case.forward(
        reference).shape[2:]).astype(dtype)
    masked = dataclasses.replace(case, options=dict(case.options, mask=mask))
    unmasked = dataclasses.replace(case, options=dict(case.options, mask=None))
    expected = unmasked.forward(pydeform).astype(np.float64) * mask
    assert_close("masked output", masked.forward(pydeform), expected, dtype)


@given(case=roi_cases(op="deform_psroi_pool", with_grad=True))
def test_deform_psroi_pool_without_trans_is_zero_trans(case):
    k = case.rois_as_rows.shape[0]
    parts = case.options["part_size"] or case.options["pooled_size"]
    zero = dataclasses.replace(case, options=dict(case.options, trans=np.zeros((k, 2, parts, parts))))
    none = dataclasses.replace(case, options=dict(case.options, trans=None))
    np.testing.assert_array_equal(none.forward(pydeform), zero.forward(pydeform))
    np.testing.assert_array_equal(none.backward(pydeform)["input"], zero.backward(pydeform)["input"])


def test_backend_numba_is_the_cpu_backend_for_numpy_arrays():
    case = build_roi_case("roi_align", np.random.default_rng(10), output_size=2, mode="max")
    np.testing.assert_array_equal(case.forward(pydeform, backend="numba"), case.forward(pydeform))
    np.testing.assert_array_equal(case.backward(pydeform, backend="numba")["input"], case.backward(pydeform)["input"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op", ["deform_roi_pool", "deform_psroi_pool"])
def test_non_finite_offsets_count_as_outside(op, bad):
    """A NaN / inf offset or trans moves a bin's samples nowhere: the result is that of a bin
    moved far outside the image (0, no gradient), everything finite."""
    rng = np.random.default_rng(12)
    k = 2 * len(ROI_KINDS)
    name, options = {
        "deform_roi_pool": ("offset", dict(output_size=(2, 3), sampling_ratio=2, gamma=0.5,
                                           offset=rng.standard_normal((k, 2, 2, 3)))),
        "deform_psroi_pool": ("trans", dict(trans=rng.standard_normal((k, 2, 2, 2)), group_size=2,
                                            pooled_size=2, trans_std=0.5)),
    }[op]
    case = build_roi_case(op, rng, channels=4, **options)
    poisoned = (np.array([0, 3, 5]), np.array([0, 1, 0]), np.array([1, 0, 1]), np.array([1, 1, 0]))
    values, far = case.options[name].copy(), case.options[name].copy()
    values[poisoned] = bad
    far[poisoned] = 1e6
    bad_case = dataclasses.replace(case, options=dict(case.options, **{name: values}))
    far_case = dataclasses.replace(case, options=dict(case.options, **{name: far}))
    assert_close("output", bad_case.forward(pydeform), far_case.forward(reference), np.float64)
    grads = bad_case.backward(pydeform)
    expected = far_case.backward(reference)
    assert_roi_grads_close(grads, expected, np.float64)
    assert np.all(grads[name][poisoned] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_modes_propagate_nan(dtype):
    """roi_pool and roi_align(mode="max"), whose CPU forwards read a channels-last copy and whose
    backwards find the arg-max per element: NaN in a bin gives NaN, its gradient goes to the first NaN."""
    check_max_modes_propagate_nan(dtype)
