"""Calls that skip the host check of box and label values (``pydeform._arrays.unchecked_values``,
what pydeform.torch and pydeform.jax do on the GPU, where the check would synchronise): the
kernels themselves keep invalid rows out. A roi whose batch index is not an integer in [0, N)
or that has a non-finite coordinate gives 0 outputs and no gradient, the other rois are
unaffected; a CenterNet object with a label outside [-1, C) or a non-finite box is not drawn; a
focal-loss target outside [0, 1] makes the loss NaN.
Run on the Numba CPU kernels and on the CUDA C kernels through the host shim."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest

import pydeform
import pydeform.centernet as centernet_module
import pydeform.roi as roi_module
import reference
from pydeform._arrays import unchecked_values, values_checked
from tests import host_shim
from tests.strategies import ROI_OPS, RoICase, assert_close, assert_roi_grads_close

VALID = [[0, 1.2, 0.7, 4.1, 5.3], [1, 0.3, 2.2, 4.4, 5.1], [1, 2.0, 1.0, 3.0, 4.5]]
INVALID = [
    [0.5, 1.0, 1.0, 3.0, 3.0],  # not an integer
    [2, 1.0, 1.0, 3.0, 3.0],  # = N
    [-1, 1.0, 1.0, 3.0, 3.0],
    [np.nan, 1.0, 1.0, 3.0, 3.0],
    [0, np.nan, 1.0, 3.0, 3.0],
    [1, 1.0, 1.0, np.inf, 3.0],
    [0, -np.inf, 1.0, 3.0, np.inf],
]
ROWS = np.array(VALID[:1] + INVALID[:4] + VALID[1:] + INVALID[4:])
VALID_AT = [0, 5, 6]

OPTIONS = {
    "roi_align": dict(output_size=2, sampling_ratio=-1),  # adaptive: an infinite box would never end
    "ps_roi_align": dict(output_size=2),
    "roi_pool": dict(output_size=2),
    "ps_roi_pool": dict(output_size=2),
    "deform_roi_pool": dict(output_size=2, sampling_ratio=-1),
    "deform_psroi_pool": dict(group_size=2, pooled_size=2, trans_std=0.1),
}
PER_ROI = {"deform_roi_pool": {"offset": (2, 2, 2), "mask": (1, 2, 2)}, "deform_psroi_pool": {"trans": (2, 2, 2)}}


@contextlib.contextmanager
def kernels_of(backend):
    """The public ops on NumPy arrays run the Numba CPU kernels, or the CUDA C kernels through
    the host shim."""
    if backend == "numba-cpu":
        yield
        return
    with mock.patch.object(roi_module, "roi_kernels", lambda library, kind: host_shim.HostShimRoIKernels()), \
            mock.patch.object(centernet_module, "centernet_kernels",
                              lambda library, kind: host_shim.HostShimCenterNetKernels()):
        yield


def test_the_block_is_per_thread_and_nests():
    import threading

    assert values_checked()
    with unchecked_values():
        assert not values_checked()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(values_checked()))
        thread.start()
        thread.join()
        assert seen == [True]
        with unchecked_values():
            assert not values_checked()
        assert not values_checked()
    assert values_checked()


def test_outside_the_block_bad_rows_still_raise():
    x = np.zeros((2, 2, 6, 6))
    for row in INVALID:
        with pytest.raises(ValueError, match="rois: row 0"):
            pydeform.roi_align(x, np.array([row]), output_size=2)


def check_invalid_rows(op, module, rows, valid_at, options=None, dtype=np.float64):
    """``module`` (``pydeform``, its kernels chosen by the caller, or ``reference``) gives the
    rows of ``rows`` not in ``valid_at`` 0 outputs and no gradient, and the others what the
    reference gives them alone; ``options`` adds to (or replaces) the op's OPTIONS."""
    rng = np.random.default_rng(3)
    invalid_at = [i for i in range(len(rows)) if i not in valid_at]
    channels = 8 if op in ("ps_roi_align", "ps_roi_pool", "deform_psroi_pool") else 2
    x = rng.standard_normal((2, channels, 6, 6)).astype(dtype)
    per_roi = {name: rng.uniform(-0.5, 0.5, (len(rows),) + shape).astype(dtype)
               for name, shape in PER_ROI.get(op, {}).items()}
    options = {**OPTIONS[op], **(options or {})}
    rows = np.asarray(rows, dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    case = RoICase(op, x, rows.copy(), {**options, **per_roi}, None)
    valid = RoICase(op, x, rows[valid_at], {**options, **{k: v[valid_at] for k, v in per_roi.items()}}, None)
    out = case.forward(module)
    grad_output = rng.standard_normal(out.shape).astype(dtype)
    grads = RoICase(op, x, case.rois, case.options, grad_output).backward(module)
    assert_close("output", out[valid_at], valid.forward(reference), dtype)
    np.testing.assert_array_equal(out[invalid_at], 0.0)
    expected = RoICase(op, x, valid.rois, valid.options, grad_output[valid_at]).backward(reference)
    for name, grad in grads.items():
        if name == "input":
            assert_roi_grads_close({name: grad}, {name: expected[name]}, dtype)
        elif grad is not None:
            assert_roi_grads_close({name: grad[valid_at]}, {name: expected[name]}, dtype)
            np.testing.assert_array_equal(grad[invalid_at], 0.0, err_msg=name)


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("op", ROI_OPS)
def test_invalid_rois_give_zeros_and_no_gradient(op, backend):
    with kernels_of(backend), unchecked_values():
        check_invalid_rows(op, pydeform, ROWS, VALID_AT)


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
def test_centernet_targets_skip_bad_labels_and_boxes(backend):
    boxes = np.array([[[4.0, 8.0, 20.0, 30.0], [10.0, 2.0, 28.0, 12.0], [1.0, 1.0, 9.0, 9.0],
                       [np.nan, 3.0, 20.0, 20.0], [2.0, 2.0, np.inf, 20.0], [5.0, 5.0, 15.0, 25.0]]])
    labels = np.array([[1, 5, -1, 0, 2, -3]])  # 5 and -3 are outside [-1, 3); 0 and 2 have bad boxes
    keep = np.array([[True, False, False, False, False, False]])
    with kernels_of(backend), unchecked_values():
        got = pydeform.centernet_targets(boxes, labels, 3, (8, 8))
    expected = reference.centernet_targets(np.where(keep[..., None], boxes, 0.0), np.where(keep, labels, -1), 3,
                                           (8, 8))
    for name in got._fields:
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-12, atol=1e-12,
                                   err_msg=name)
    assert got.heatmap.max() == 1.0 and got.reg_mask.sum() == 1


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5, -0.25])
def test_focal_loss_of_a_target_outside_0_1_is_nan(backend, bad):
    """Unchecked, a target value outside [0, 1] (or NaN) is not left out: the loss is NaN and so
    is that pixel's gradient; the other pixels' gradients are those of a target 0 there."""
    rng = np.random.default_rng(4)
    pred = rng.uniform(0.05, 0.95, (1, 2, 3, 4))
    target = rng.uniform(0.0, 0.9, pred.shape)
    target[0, 0, 1, 1] = 1.0
    bad_target, at = target.copy(), (0, 1, 2, 3)
    bad_target[at] = bad
    with kernels_of(backend), unchecked_values():
        loss = pydeform.centernet_focal_loss(pred, bad_target)
        grad = pydeform.centernet_focal_loss_backward(np.array(0.5), pred, bad_target)
    assert np.isnan(loss)
    target[at] = 0.0
    expected = reference.centernet_focal_loss_backward(0.5, pred, target)
    assert np.isnan(grad[at])
    grad[at] = expected[at]
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
