"""Caller-provided outputs and scratch (what pydeform.jax hands the drivers): with exactly the
planned buffers the drivers write their results into the provided outputs and allocate no
scratch of their own; an unplanned slot is an error. No JAX needed."""

import numpy as np
import pytest

import pydeform
from pydeform import _workspace, centernet, deform_conv, roi
from pydeform._workspace import provided
from pydeform.backends import centernet_kernels, deform_conv2d_kernels, roi_kernels
from pydeform.backends.cupy_kernels.deform_conv import CupyDeformConv2dKernels
from pydeform.backends.cupy_kernels.roi import CupyRoIKernels
from pydeform.backends.numba_kernels.centernet import NumbaCudaCenterNetKernels
from pydeform.backends.numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels
from pydeform.backends.numba_kernels.roi import NumbaCudaRoIKernels


def buffers_for(outputs: dict, plan: dict):
    """Fresh buffers for the output and scratch slots, NaN-filled (an unwritten element shows)
    or 7 in integer slots."""
    return {slot: np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 7, dtype)
            for slot, (shape, dtype) in {**outputs, **plan}.items()}


def deform_case(rng, n=3):
    x = rng.standard_normal((n, 4, 6, 6))
    offset = rng.uniform(-2, 2, (n, 18, 6, 6))
    weight = rng.standard_normal((4, 2, 3, 3))
    bias = rng.standard_normal(4)
    mask = rng.uniform(0, 1, (n, 9, 6, 6))
    return x, offset, weight, bias, mask


@pytest.mark.parametrize("column_bytes", [deform_conv.COLUMN_BUFFER_BYTES, 1])
def test_deform_conv2d_writes_into_the_provided_buffers(monkeypatch, column_bytes):
    # column_bytes=1 forces one image per chunk, so the planned buffers hold a chunk, not the batch.
    monkeypatch.setattr(deform_conv, "COLUMN_BUFFER_BYTES", column_bytes)
    x, offset, weight, bias, mask = deform_case(np.random.default_rng(0))
    kernels = deform_conv2d_kernels("numpy", "numba")
    expected = pydeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    shapes = {"input": x.shape, "offset": offset.shape, "weight": weight.shape, "bias": bias.shape, "mask": mask.shape}
    geometry = deform_conv.deform_conv2d_geometry(shapes, 1, 1, 1)
    plan = deform_conv.deform_conv2d_workspace(kernels, x.shape[0], geometry, x.dtype, backward=False, masked=True)
    # The direct CPU forward: a channels-last input copy, the rearranged weight and the workers'
    # tiles of sampled values, no columns.
    assert set(plan) == {"input_hwc", "weight_rows", "tile_values"}
    buffers = buffers_for({"output": (expected.shape, x.dtype)}, plan)
    with provided(buffers):
        out = pydeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert np.shares_memory(out, buffers["output"])
    np.testing.assert_array_equal(buffers["output"], expected)
    np.testing.assert_array_equal(buffers["input_hwc"], x.transpose(0, 2, 3, 1).ravel())

    grad_output = np.random.default_rng(1).standard_normal(expected.shape)
    expected_grads = pydeform.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    plan = deform_conv.deform_conv2d_workspace(kernels, x.shape[0], geometry, x.dtype, backward=True, masked=True)
    assert plan["columns"][0][0] == (1 if column_bytes == 1 else x.shape[0])
    outputs = {f"grad_{name}": (shape, x.dtype) for name, shape in shapes.items()}
    buffers = buffers_for(outputs, plan)
    with provided(buffers):
        grads = pydeform.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    for name in shapes:
        assert np.shares_memory(getattr(grads, name), buffers[f"grad_{name}"]), name
        # Last bits may differ: the BLAS GEMM can block differently for differently aligned buffers.
        np.testing.assert_allclose(buffers[f"grad_{name}"], getattr(expected_grads, name), rtol=1e-12, atol=1e-12)


def test_roi_ops_write_into_the_provided_buffers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8, 8))
    rois = np.array([[0, 1.2, 0.7, 6.1, 5.3], [1, 0.3, 2.2, 4.4, 7.1]])
    offset = rng.uniform(-0.2, 0.2, (2, 2, 3, 3))
    expected = pydeform.deform_roi_pool(x, rois, offset, output_size=3)
    buffers = buffers_for({"output": (expected.shape, x.dtype)}, {})
    with provided(buffers):
        out = pydeform.deform_roi_pool(x, rois, offset, output_size=3)
    assert np.shares_memory(out, buffers["output"])
    np.testing.assert_array_equal(out, expected)

    grad_output = rng.standard_normal(expected.shape)
    expected_grads = pydeform.deform_roi_pool_backward(grad_output, x, rois, offset, output_size=3)
    grad_shapes = {"grad_input": x.shape, "grad_offset": offset.shape}
    shapes = {"input": x.shape, "rois": rois.shape, "offset": offset.shape}
    params = roi.deform_roi_pool_params(shapes, 2, 3, 1.0, 0, 0.1)
    for backward in (False, True):  # float64 accumulates in place; the CPU forward reads the input
        assert roi.roi_workspace(roi_kernels("numpy", "numba"), params, shapes, x.dtype, backward=backward) == {}
    buffers = buffers_for({name: (shape, x.dtype) for name, shape in grad_shapes.items()}, {})
    with provided(buffers):
        grads = pydeform.deform_roi_pool_backward(grad_output, x, rois, offset, output_size=3)
    assert np.shares_memory(grads.input, buffers["grad_input"])
    assert np.shares_memory(grads.offset, buffers["grad_offset"])
    np.testing.assert_allclose(grads.input, expected_grads.input, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.offset, expected_grads.offset, rtol=1e-12, atol=1e-12)


def half_outputs(arguments: dict, out_shape, backward: bool) -> dict:
    """The float16 outputs of a forward (``output``) or of a backward (a gradient of each of the
    ``arguments``, ``{name: shape}``)."""
    if backward:
        return {f"grad_{name}": (shape, np.float16) for name, shape in arguments.items()}
    return {"output": (out_shape, np.float16)}


def assert_launches_use_the_plan(arrays, buffers: dict, plan: dict):
    """Every one of ``arrays`` (those handed to the recorded launches) is a provided buffer,
    float32 where it is floating (half types are computed in float32), and every slot of the
    scratch ``plan`` is handed to a launch (nothing is planned in vain)."""
    assert arrays
    for a in arrays:
        assert a.dtype.kind != "f" or a.dtype == np.float32, a.dtype
        assert any(np.shares_memory(a, b) for b in buffers.values()), a.shape
    for slot in plan:
        assert any(np.shares_memory(a, buffers[slot]) for a in arrays), slot


@pytest.mark.parametrize("op, static, plans_a_copy", [
    ("roi_align", dict(output_size=3, sampling_ratio=2), True),
    ("roi_pool", dict(output_size=3), True),
    ("ps_roi_align", dict(output_size=3, sampling_ratio=2), False),
])
def test_numba_cpu_roi_forward_copies_the_input_into_the_planned_slot(op, static, plans_a_copy):
    """The CPU forwards of plain roi_align and roi_pool read a channels-last copy of the input:
    planned by roi_workspace, it is written into the provided slot (the position-sensitive
    forward reads the input as it is and plans nothing)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 9, 8, 8))
    rois = np.array([[0, 1.2, 0.7, 6.1, 5.3], [1, 0.3, 2.2, 4.4, 7.1]])
    kernels = roi_kernels("numpy", "numba")
    shapes = {"input": x.shape, "rois": rois.shape}
    if op == "roi_pool":
        params = roi.roi_pool_params(shapes, 2, 3, 1.0, False)
    else:
        params = roi.roi_align_params(shapes, 2, 3, 1.0, 2, op == "ps_roi_align", "avg", op == "ps_roi_align")
    function = getattr(pydeform, op)
    expected = function(x, rois, **static)
    plan = roi.roi_workspace(kernels, params, shapes, x.dtype, backward=False)
    assert plan == ({"input_hwc": ((x.size,), x.dtype)} if plans_a_copy else {})
    assert roi.roi_workspace(kernels, params, shapes, x.dtype, backward=True) == {}
    assert roi.roi_workspace(kernels, params, {**shapes, "rois": (0, 5)}, x.dtype, backward=False) == {}
    buffers = buffers_for({"output": (expected.shape, x.dtype)}, plan)
    with provided(buffers):
        out = function(x, rois, **static)
    assert np.shares_memory(out, buffers["output"])
    np.testing.assert_array_equal(out, expected)
    if plans_a_copy:
        np.testing.assert_array_equal(buffers["input_hwc"], x.transpose(0, 2, 3, 1).ravel())


# op -> (array-level op name, parameter check given (shapes, k), optional arrays' shapes given k, static)
ROI_HALF_CASES = {
    "roi_align": ("roi_align", lambda shapes, k: roi.roi_align_params(shapes, k, 2, 1.0, 2, False, "avg", False),
                  lambda k: {}, dict(output_size=2, sampling_ratio=2)),
    "ps_roi_pool": ("ps_roi_pool", lambda shapes, k: roi.roi_pool_params(shapes, k, 2, 1.0, True), lambda k: {},
                    dict(output_size=2)),
    "deform_roi_pool": ("deform_roi_pool", lambda shapes, k: roi.deform_roi_pool_params(shapes, k, 2, 1.0, 2, 0.1),
                        lambda k: {"offset": (k, 2, 2, 2), "mask": (k, 1, 2, 2)},
                        dict(output_size=2, sampling_ratio=2)),
    "deform_roi_pool_offset_only": ("deform_roi_pool",
                                    lambda shapes, k: roi.deform_roi_pool_params(shapes, k, 2, 1.0, 2, 0.1),
                                    lambda k: {"offset": (k, 2, 2, 2)}, dict(output_size=2, sampling_ratio=2)),
    "deform_psroi_pool": ("deform_psroi_pool",
                          lambda shapes, k: roi.deform_psroi_pool_params(shapes, k, 2, 2, 2, None, 2, 0.1, 1.0),
                          lambda k: {"trans": (k, 2, 2, 2)},
                          dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=0.1)),
}


@pytest.mark.parametrize("case", sorted(ROI_HALF_CASES))
def test_numba_cuda_roi_half_copies_come_from_the_planned_slots(monkeypatch, case):
    """The RoI drivers on the Numba CUDA kernel set and float16 host arrays (the array checks,
    which allow no half types on the CPU, replaced by handing the arrays over as they are; the
    launches are recorded, not run) inside a provided block holding exactly the outputs and
    roi_workspace's plan: every array a launch gets, but the boxes and the one-element
    stand-ins of absent arrays, is a provided float32 buffer, and every planned slot is used."""
    op, params_of, extra_shapes, static = ROI_HALF_CASES[case]
    kernels = NumbaCudaRoIKernels(xp=np)
    launched = []
    monkeypatch.setattr(kernels, "_launch", lambda family, backward, n_items, *args: launched.append(args))
    monkeypatch.setattr(roi, "_prepare", lambda arrays, ranks, rois, backend: roi._Call(kernels, np, arrays, rois))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float16)
    rois = np.array([[0, 0.5, 1.0, 4.5, 5.0], [1, 1.5, 0.2, 5.1, 3.3], [1, 0.0, 0.0, 6.0, 6.0]], np.float32)
    k = rois.shape[0]
    extras = {name: rng.uniform(-0.5, 0.5, shape).astype(np.float16) for name, shape in extra_shapes(k).items()}
    shapes = {"input": x.shape, "rois": rois.shape, **{name: a.shape for name, a in extras.items()}}
    params = params_of(shapes, k)
    out_shape = roi.roi_output_shape(params, k)
    for backward in (False, True):
        plan = roi.roi_workspace(kernels, params, shapes, np.float16, backward=backward)
        arguments = {name: shape for name, shape in shapes.items() if name != "rois"}
        buffers = buffers_for(half_outputs(arguments, out_shape, backward), plan)
        launched.clear()
        with provided(buffers):
            if backward:
                getattr(pydeform, op + "_backward")(np.ones(out_shape, np.float16), x, rois, **extras, **static)
            else:
                getattr(pydeform, op)(x, rois, **extras, **static)
        assert len(launched) == 1
        assert_launches_use_the_plan([a for a in launched[0] if isinstance(a, np.ndarray) and a.size > 1
                                      and not np.shares_memory(a, rois)], buffers, plan)


def test_an_unplanned_or_too_small_slot_is_an_error():
    x, offset, weight, bias, mask = deform_case(np.random.default_rng(3), n=1)
    with provided({}):
        with pytest.raises(RuntimeError, match="no buffer provided for slot 'output'"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    with provided({"output": np.empty((1, 4, 6, 6)), "weight_rows": np.empty(3)}):
        with pytest.raises(RuntimeError, match="slot 'weight_rows' needs"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    grads = {f"grad_{name}": np.empty(a.shape) for name, a in (("input", x), ("offset", offset), ("weight", weight))}
    with provided({**grads, "input_hwc": np.empty(x.size), "grad_columns": np.empty(36 * 36), "columns": np.empty(3)}):
        with pytest.raises(RuntimeError, match="slot 'columns' needs"):
            pydeform.deform_conv2d_backward(np.ones((1, 4, 6, 6)), x, offset, weight, padding=1)
    with provided({"output": np.empty((1, 4, 6, 6), np.float32)}):
        with pytest.raises(RuntimeError, match="slot 'output' needs 144 elements of float64"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    # Outside the block the drivers allocate again.
    assert pydeform.deform_conv2d(x, offset, weight, padding=1).shape == (1, 4, 6, 6)


def test_half_types_plan_float32_copies_and_accumulators():
    geometry = deform_conv.deform_conv2d_geometry(
        {"input": (5, 4, 6, 6), "offset": (5, 18, 6, 6), "weight": (4, 2, 3, 3)}, 1, 1, 1)
    cupy_kernels, numba_cuda_kernels = CupyDeformConv2dKernels(), NumbaCudaDeformConv2dKernels(xp=np)
    for kernels in (cupy_kernels, numba_cuda_kernels):
        for dtype in (np.float32, np.float64):
            plan = deform_conv.deform_conv2d_workspace(kernels, 5, geometry, dtype, backward=True, masked=True)
            assert set(plan) == {"columns", "grad_columns", "grad_weight_chunk"}
    plan = deform_conv.deform_conv2d_workspace(cupy_kernels, 5, geometry, np.float16, backward=True, masked=True)
    assert plan["grad_input:acc"] == ((5, 4, 6, 6), np.float32)
    assert plan["grad_weight:acc"] == ((4, 2, 3, 3), np.float32)
    assert plan["weight:acc"] == ((4, 2, 3, 3), np.float32)
    assert plan["grad_output:acc"] == ((5, 4, 6, 6), np.float32)
    assert plan["columns"] == ((5, 36, 36), np.float32)
    forward = deform_conv.deform_conv2d_workspace(cupy_kernels, 5, geometry, np.float16, backward=False, masked=True)
    assert set(forward) == {"columns", "weight:acc", "bias:acc", "output:acc"}
    # The Numba CUDA kernels compute in float32: planned copies of what they read and write.
    forward = deform_conv.deform_conv2d_workspace(numba_cuda_kernels, 5, geometry, np.float16, backward=False,
                                                  masked=True)
    assert set(forward) == {"columns", "weight:acc", "bias:acc", "output:acc", "input:acc", "offset:acc", "mask:acc"}
    assert forward["offset:acc"] == ((5, 18, 6, 6), np.float32) and forward["mask:acc"] == ((5, 9, 6, 6), np.float32)
    backward = deform_conv.deform_conv2d_workspace(numba_cuda_kernels, 5, geometry, np.float16, backward=True,
                                                   masked=False)
    assert {"input:acc", "offset:acc", "grad_offset:acc"} <= set(backward) and "mask:acc" not in backward
    shapes = {"input": (2, 3, 4, 4), "rois": (5, 5)}
    params = roi.roi_align_params(shapes, 5, 2, 1.0, 2, False, "avg", False)
    assert roi.roi_workspace(CupyRoIKernels(), params, shapes, np.float16, backward=False) == {}
    assert roi.roi_workspace(CupyRoIKernels(), params, shapes, np.float16, backward=True) == {
        "grad_input:acc": ((2, 3, 4, 4), np.float32)}


@pytest.mark.parametrize("masked", [False, True])
def test_numba_cuda_half_copies_come_from_the_planned_slots(monkeypatch, masked):
    """The Numba CUDA kernel set on float16 arrays, run by the drivers inside a provided block
    holding exactly its plan (host arrays; the launches are recorded, not run): every float32
    copy it hands a kernel is one of the provided buffers, so nothing is allocated behind the
    caller's back."""
    kernels = NumbaCudaDeformConv2dKernels(xp=np)
    launched = []
    monkeypatch.setattr(kernels, "_launch", lambda index, n_items, *args: launched.append(args))
    rng = np.random.default_rng(5)
    x, offset, weight, bias, mask = (a.astype(np.float16) for a in deform_case(rng, n=2))
    mask = mask if masked else None
    shapes = {"input": x.shape, "offset": offset.shape, "weight": weight.shape, "bias": bias.shape,
              "mask": None if mask is None else mask.shape}
    geometry = deform_conv.deform_conv2d_geometry(shapes, 1, 1, 1)
    out_shape = (2, 4, 6, 6)
    for backward in (False, True):
        plan = deform_conv.deform_conv2d_workspace(kernels, 2, geometry, np.float16, backward=backward,
                                                   masked=masked)
        if backward:
            outputs = {f"grad_{name}": (shape, np.float16) for name, shape in shapes.items() if shape is not None}
        else:
            outputs = {"output": (out_shape, np.float16)}
        buffers = buffers_for(outputs, plan)
        launched.clear()
        with provided(buffers):
            if backward:
                deform_conv.run_deform_conv2d_backward(kernels, np.ones(out_shape, np.float16), x, offset, mask,
                                                       weight, bias, geometry)
            else:
                deform_conv.run_deform_conv2d_forward(kernels, x, offset, mask, weight, bias, geometry)
        arrays = [a for args in launched for a in args if isinstance(a, np.ndarray) and a.size > 1]
        assert launched and arrays
        for a in arrays:
            assert a.dtype == np.float32
            assert any(np.shares_memory(a, b) for b in buffers.values()), a.shape


def test_provided_blocks_are_per_thread_and_restore_the_previous_one():
    import threading

    outer = {"output": np.empty(1)}
    with provided(outer):
        seen = []
        thread = threading.Thread(target=lambda: seen.append(getattr(_workspace._local, "arena", None)))
        thread.start()
        thread.join()
        assert seen == [None]
        with provided({}):
            assert _workspace._local.arena == {}
        assert _workspace._local.arena is outer
    assert _workspace._local.arena is None


def centernet_buffers(kernels, params, dtype, **options):
    # 7 in integer slots: the targets must come back zero-filled.
    return buffers_for(*centernet.centernet_workspace(kernels, params, dtype, **options))


@pytest.mark.parametrize("batch, K", [(2, 7), (2, 0), (0, 5)])
def test_centernet_decode_writes_into_the_provided_buffers(batch, K):
    rng = np.random.default_rng(4)
    heat, wh = rng.uniform(0, 1, (batch, 3, 6, 5)), rng.uniform(1, 4, (batch, 2, 6, 5))
    expected = pydeform.centernet_decode(heat, wh, K=K)
    kernels = centernet_kernels("numpy", "numba")
    params = centernet.CenterNetDecodeParams(batch, 3, 6, 5, K, 3, False, False, 1.0, False, 0.0)
    buffers = centernet_buffers(kernels, params, np.float64)
    assert set(buffers) == {"output"} | (set(kernels.decode_workspace(params, np.float64)) if batch and K else set())
    with provided(buffers):
        got = pydeform.centernet_decode(heat, wh, K=K)
    assert np.shares_memory(got, buffers["output"]) or got.size == 0
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("labels_dtype", [np.int64, np.int16])
def test_centernet_targets_write_into_the_provided_buffers(labels_dtype):
    boxes = np.array([[[2.0, 3.0, 14.5, 11.0], [10.0, 8.0, 30.0, 20.0], [0, 0, 0, 0]]])
    labels = np.array([[1, 0, -1]], dtype=labels_dtype)
    expected = pydeform.centernet_targets(boxes, labels, 2, (8, 9), max_objects=2)
    params = centernet.CenterNetTargetsParams(1, 3, 2, 8, 9, 4.0, 0.7, 2)
    buffers = centernet_buffers(centernet_kernels("numpy", "numba"), params, np.float64, labels_dtype=labels_dtype)
    assert ("centernet_labels" in buffers) == (labels_dtype != np.int64)
    with provided(buffers):
        got = pydeform.centernet_targets(boxes, labels, 2, (8, 9), max_objects=2)
    for name, value in expected._asdict().items():
        assert np.shares_memory(getattr(got, name), buffers[name]), name
        np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
    np.testing.assert_array_equal(labels, [[1, 0, -1]])


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (0, 3, 5, 4)])
def test_centernet_focal_loss_writes_into_the_provided_buffers(shape):
    rng = np.random.default_rng(5)
    pred, target = rng.uniform(0.05, 0.95, shape), np.where(rng.uniform(size=shape) > 0.9, 1.0, 0.3)
    grad_output = np.array(1.5)
    kernels = centernet_kernels("numpy", "numba")
    params = centernet.FocalLossParams(2.0, 4.0)
    for backward in (False, True):
        expected = (pydeform.centernet_focal_loss_backward(grad_output, pred, target) if backward
                    else pydeform.centernet_focal_loss(pred, target))
        buffers = centernet_buffers(kernels, params, np.float64, shape=shape, backward=backward)
        with provided(buffers):
            got = (pydeform.centernet_focal_loss_backward(grad_output, pred, target) if backward
                   else pydeform.centernet_focal_loss(pred, target))
        slot = "grad_pred" if backward else "output"
        assert got.shape == expected.shape and (np.shares_memory(got, buffers[slot]) or got.size == 0)
        np.testing.assert_array_equal(got, expected)
    assert ("centernet_focal_sums" in buffers) == bool(pred.size)


def test_numba_cuda_centernet_half_copies_come_from_the_planned_slots(monkeypatch):
    """The CenterNet decode and focal loss drivers on the Numba CUDA kernel set and float16
    host arrays (the array checks, which allow no half types on the CPU, told they are CuPy
    halves; the launches are recorded, not run) inside a provided block holding exactly
    centernet_workspace's plan: every array a launch gets is a provided buffer, float32 where
    it is floating, and every planned scratch slot is used."""
    kernels = NumbaCudaCenterNetKernels(xp=np, chunk=16)
    launched = []
    monkeypatch.setattr(kernels, "_kernels", lambda dtype: range(6))  # the six kernels, never run
    monkeypatch.setattr(kernels, "_run", lambda kernel, n_items, *args: launched.append(args))
    monkeypatch.setattr(centernet, "centernet_kernels", lambda library, backend: kernels)
    monkeypatch.setattr(centernet, "check_arrays", lambda arrays, ranks: ("numpy", np.dtype(np.float16)))
    rng = np.random.default_rng(8)
    heat, wh, reg = (rng.uniform(0, 1, (2, c, 6, 5)).astype(np.float16) for c in (3, 6, 2))
    pred, target = (rng.uniform(0.05, 0.95, (2, 3, 5, 4)).astype(np.float16) for _ in range(2))
    decode = centernet.centernet_decode_params(heat.shape, wh.shape, reg.shape, 4, 3, True, 1.0, None)
    focal = centernet.FocalLossParams(2.0, 4.0)
    runs = [
        (decode, {}, lambda: pydeform.centernet_decode(heat, wh, reg, K=4, cat_spec_wh=True)),
        (focal, dict(shape=pred.shape), lambda: pydeform.centernet_focal_loss(pred, target)),
        (focal, dict(shape=pred.shape, backward=True),
         lambda: pydeform.centernet_focal_loss_backward(np.array(1.5, np.float16), pred, target)),
    ]
    for params, options, run in runs:
        outputs, work = centernet.centernet_workspace(kernels, params, np.float16, **options)
        copies = {slot for slot in work if slot.endswith(":acc")}
        assert copies and all(work[slot][1] == np.float32 for slot in copies)
        buffers = centernet_buffers(kernels, params, np.float16, **options)
        launched.clear()
        with provided(buffers):
            run()
        assert_launches_use_the_plan([a for args in launched for a in args if isinstance(a, np.ndarray)], buffers,
                                     work)


@pytest.mark.parametrize("kernels", [CupyRoIKernels(), NumbaCudaRoIKernels(xp=np)], ids=["cupy", "numba"])
def test_deterministic_roi_plans_on_the_gpu_sets(kernels):
    """The GPU kernel sets plan the deterministic backward's lists ahead of the boxes where a
    bound exists: ps_roi_pool reserves K * (H + PH - 1) * (W + PW - 1) contributions; adaptive
    sampling raises, naming the argument."""
    shapes = {"input": (2, 2 * 9, 6, 5), "rois": (4, 5)}
    params = roi.roi_pool_params(shapes, 4, 3, 1.0, True)
    plan = roi.roi_workspace(kernels, params, shapes, np.float32, backward=True, deterministic=True)
    assert plan["contribution_item"] == ((4 * (6 + 3 - 1) * (5 + 3 - 1),), np.int64)
    assert plan["bucket_counts"] == ((2 * 9 * 6 * 5,), np.uint64)
    params = roi.roi_align_params(shapes, 4, 3, 1.0, 0, True, "avg", False)
    with pytest.raises(ValueError, match="^deterministic: .*adaptive sampling"):
        roi.roi_workspace(kernels, params, shapes, np.float32, backward=True, deterministic=True)


def semiconv_half_runs(rng):
    """(op, argument shapes, options of semiconv_workspace, forward, backward and the gradients
    it returns, or None) of every semi-convolutional driver pydeform.jax launches, on float16
    host arrays."""
    n, dims, height, width, k = 2, 3, 4, 5, 4
    psi, centers = rng.standard_normal((n, dims, height, width)), rng.standard_normal((n, k, dims))
    scores, sigma = rng.standard_normal((n, height, width)), rng.uniform(0.5, 2, (n, k))
    psi, centers, scores, sigma = (a.astype(np.float16) for a in (psi, centers, scores, sigma))
    labels, foreground = rng.integers(0, k + 1, (n, height, width)), rng.random((n, height, width)) < 0.6
    maps, grad = np.ones((n, k, height, width), np.float16), np.ones((n, height, width), np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # the launches do not run: the statistics are garbage
        _, statistics = pydeform.instance_mean_loss(psi, labels, k, return_statistics=True)
    return [
        ("instance_means", {"psi": psi.shape}, dict(num_instances=k),
         lambda: pydeform.instance_means(psi, labels, k, coordinates=True), None),
        ("instance_mean_loss", {"psi": psi.shape}, dict(num_instances=k),
         lambda: pydeform.instance_mean_loss(psi, labels, k, return_statistics=True),
         (lambda: pydeform.instance_mean_loss_backward(np.float16(1.5), psi, labels, k, statistics=statistics),
          {"grad_psi": psi.shape})),
        ("affinity", {"psi": psi.shape, "centers": centers.shape, "sigma": sigma.shape}, {},
         lambda: pydeform.affinity(psi, centers, sigma),
         (lambda: pydeform.affinity_backward(maps, psi, centers, sigma, "gaussian"),
          {"grad_psi": psi.shape, "grad_centers": centers.shape, "grad_sigma": sigma.shape})),
        ("seeded_mask_logits", {"scores": scores.shape, "psi": psi.shape}, {},
         lambda: pydeform.seeded_mask_logits(scores, psi, 1.5, "softmax"),
         (lambda: pydeform.seeded_mask_logits_backward(grad, scores, psi, 1.5, "softmax"),
          {"grad_scores": scores.shape, "grad_psi": psi.shape})),
        ("hough_votes", {"psi": psi.shape}, dict(vote_shape=(3, 6)),
         lambda: pydeform.hough_votes(psi, foreground, (3, 6)), None),
        ("assign_to_centers", {"psi": psi.shape, "centers": centers.shape}, {},
         lambda: pydeform.assign_to_centers(psi, foreground, centers, 2.0), None),
    ]


def test_numba_cuda_semiconv_half_copies_come_from_the_planned_slots(monkeypatch):
    """The semi-convolutional drivers on the Numba CUDA kernel set and float16 host arrays (the
    array checks, which allow no half types on the CPU, told they are CuPy halves; the launches
    are recorded, not run) inside a provided block holding exactly semiconv_workspace's plan, as
    pydeform.jax runs them: they find every float32 copy the kernels read and write among the
    provided buffers, hand the kernels float32 arrays only, and use every planned copy."""
    from pydeform import semiconv
    from pydeform.backends.numba_kernels.semiconv import NumbaCudaSemiConvKernels

    kernels = NumbaCudaSemiConvKernels(xp=np)
    launched = []
    monkeypatch.setattr(kernels, "_run", lambda index, n_items, *args: launched.append(args))
    monkeypatch.setattr(semiconv, "_kernels", lambda library, backend: kernels)
    monkeypatch.setattr(semiconv, "check_arrays", lambda arrays, ranks: ("numpy", np.dtype(np.float16)))
    for op, shapes, options, forward, backward in semiconv_half_runs(np.random.default_rng(9)):
        outputs, forward_plan, backward_plan = semiconv.semiconv_workspace(kernels, op, shapes, np.float16, **options)
        runs = [(forward, outputs, forward_plan)]
        if backward is not None:
            run, gradients = backward
            runs.append((run, {slot: (shape, np.float16) for slot, shape in gradients.items()}, backward_plan))
        for run, run_outputs, plan in runs:
            buffers = buffers_for(run_outputs, plan)
            launched.clear()
            # The launches do not run: what the drivers compute from the buffers' fill may overflow.
            with provided(buffers), np.errstate(over="ignore", invalid="ignore"):
                run()
            arrays = [a for args in launched for a in args if isinstance(a, np.ndarray)]
            assert arrays and all(a.dtype.kind != "f" or a.dtype == np.float32 for a in arrays), op
            copies = {slot for slot in plan if slot.endswith(":acc")}
            assert copies and all(plan[slot][1] == np.float32 for slot in copies), (op, plan)
            for slot in copies:
                assert any(np.shares_memory(a, buffers[slot]) for a in arrays), (op, slot)
