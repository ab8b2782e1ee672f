"""Caller-provided outputs and scratch (what pydeform.jax hands the drivers): with exactly the
planned buffers the drivers write their results into the provided outputs and allocate no
scratch of their own; an unplanned slot is an error. No JAX needed."""

import numpy as np
import pytest

import pydeform
from pydeform import _workspace, deform_conv, roi
from pydeform._workspace import provided


def buffers_for(outputs: dict, plan: dict):
    """Fresh NaN-filled buffers for the output and scratch slots (NaN: an unwritten element shows)."""
    return {slot: np.full(shape, np.nan, dtype) for slot, (shape, dtype) in {**outputs, **plan}.items()}


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
    expected = pydeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    shapes = {"input": x.shape, "offset": offset.shape, "weight": weight.shape, "bias": bias.shape, "mask": mask.shape}
    geometry = deform_conv.deform_conv2d_geometry(shapes, 1, 1, 1)
    plan = deform_conv.deform_conv2d_workspace(x.shape[0], geometry, x.dtype, backward=False)
    assert plan["columns"][0][0] == (1 if column_bytes == 1 else x.shape[0])
    buffers = buffers_for({"output": (expected.shape, x.dtype)}, plan)
    with provided(buffers):
        out = pydeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert np.shares_memory(out, buffers["output"])
    # Last bits may differ: the BLAS GEMM can block differently for differently aligned buffers.
    np.testing.assert_allclose(buffers["output"], expected, rtol=1e-12, atol=1e-12)

    grad_output = np.random.default_rng(1).standard_normal(expected.shape)
    expected_grads = pydeform.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    plan = deform_conv.deform_conv2d_workspace(x.shape[0], geometry, x.dtype, backward=True)
    outputs = {f"grad_{name}": (shape, x.dtype) for name, shape in shapes.items()}
    buffers = buffers_for(outputs, plan)
    with provided(buffers):
        grads = pydeform.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    for name in shapes:
        assert np.shares_memory(getattr(grads, name), buffers[f"grad_{name}"]), name
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
    assert roi.roi_workspace(grad_shapes, x.dtype) == {}  # float64 accumulates in place
    buffers = buffers_for({name: (shape, x.dtype) for name, shape in grad_shapes.items()}, {})
    with provided(buffers):
        grads = pydeform.deform_roi_pool_backward(grad_output, x, rois, offset, output_size=3)
    assert np.shares_memory(grads.input, buffers["grad_input"])
    assert np.shares_memory(grads.offset, buffers["grad_offset"])
    np.testing.assert_allclose(grads.input, expected_grads.input, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.offset, expected_grads.offset, rtol=1e-12, atol=1e-12)


def test_an_unplanned_or_too_small_slot_is_an_error():
    x, offset, weight, bias, mask = deform_case(np.random.default_rng(3), n=1)
    with provided({}):
        with pytest.raises(RuntimeError, match="no buffer provided for slot 'output'"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    with provided({"output": np.empty((1, 4, 6, 6)), "columns": np.empty(3)}):
        with pytest.raises(RuntimeError, match="slot 'columns' needs"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    with provided({"output": np.empty((1, 4, 6, 6), np.float32)}):
        with pytest.raises(RuntimeError, match="slot 'output' needs 144 elements of float64"):
            pydeform.deform_conv2d(x, offset, weight, padding=1)
    # Outside the block the drivers allocate again.
    assert pydeform.deform_conv2d(x, offset, weight, padding=1).shape == (1, 4, 6, 6)


def test_half_types_plan_float32_copies_and_accumulators():
    geometry = deform_conv.deform_conv2d_geometry(
        {"input": (5, 4, 6, 6), "offset": (5, 18, 6, 6), "weight": (4, 2, 3, 3)}, 1, 1, 1)
    for dtype in (np.float32, np.float64):
        plan = deform_conv.deform_conv2d_workspace(5, geometry, dtype, backward=True)
        assert set(plan) == {"columns", "grad_columns", "grad_weight_chunk"}
    plan = deform_conv.deform_conv2d_workspace(5, geometry, np.float16, backward=True)
    assert plan["grad_input:acc"] == ((5, 4, 6, 6), np.float32)
    assert plan["grad_weight:acc"] == ((4, 2, 3, 3), np.float32)
    assert plan["weight:acc"] == ((4, 2, 3, 3), np.float32)
    assert plan["grad_output:acc"] == ((5, 4, 6, 6), np.float32)
    assert plan["columns"] == ((5, 36, 36), np.float32)
    forward = deform_conv.deform_conv2d_workspace(5, geometry, np.float16, backward=False)
    assert set(forward) == {"columns", "weight:acc", "bias:acc", "output:acc"}
    assert roi.roi_workspace({"grad_input": (2, 3, 4, 4)}, np.float16) == {"grad_input:acc": ((2, 3, 4, 4), np.float32)}


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
