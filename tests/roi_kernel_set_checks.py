"""Checks of a RoI *kernel set* called directly with the arguments the public op prepares,
against the float64 reference; shared by the tests of every backend (NumPy or CuPy arrays).

The op runs once with a :class:`Recorder` as its kernel set, which keeps the (method,
arguments) it is given; the real kernel set then runs that call with its output poisoned.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np

import pydeform
import reference
from pydeform import roi as roi_module
from tests.strategies import RoICase, assert_close, to_numpy

#: The gradients a backward kernel-set method accumulates into: its arguments before ``params``.
GRADIENTS = {
    "roi_align_backward": ("input",),
    "roi_pool_backward": ("input",),
    "deform_roi_pool_backward": ("input", "offset", "mask"),
    "deform_psroi_pool_backward": ("input", "trans"),
}


class Recorder:
    """A kernel set for arrays of ``xp`` that records its method calls instead of running them."""

    def __init__(self, xp):
        self.xp = xp
        self.calls = []

    def __getattr__(self, method):
        return lambda *args: self.calls.append((method, args))


def recorded_call(run, xp=np):
    """The (method, arguments) the op makes of its kernel set when ``run()`` runs it."""
    recorder = Recorder(xp)
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: recorder):
        run()
    (call,) = recorder.calls
    return call


def gradient_arguments(method, args) -> dict:
    """The gradient arrays (or None) among a backward call's arguments, by argument name."""
    names = GRADIENTS[method.removesuffix("_deterministic")]
    return dict(zip(names, args[-1 - len(names):-1]))


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_kernel_call(kernels, method, args, expected) -> None:
    """Run a recorded call on ``kernels``: a forward's output is poisoned with NaN first and
    must end equal to ``expected`` (an array); a backward's gradients must arrive zero-filled
    and end equal to ``expected`` (the reference's dict). No other array may change."""
    forward = method.endswith("_forward")
    written = [args[-2]] if forward else [g for g in gradient_arguments(method, args).values() if g is not None]
    if forward:
        args[-2][...] = np.nan
    else:
        assert all(not g.any() for g in written), f"{method}: gradients must arrive zero-filled"
    read = [a for a in args if _is_array(a) and not any(a is w for w in written)]
    before = [to_numpy(a).copy() for a in read]
    getattr(kernels, method)(*args)
    if forward:
        assert_close("output", args[-2], expected, args[0].dtype)
    else:
        for name, grad in gradient_arguments(method, args).items():
            assert (grad is None) == (expected[name] is None), name
            if grad is not None:
                assert_close(f"grad {name}", grad, expected[name], args[1].dtype)
    for got, previous in zip(read, before):
        np.testing.assert_array_equal(to_numpy(got), previous, err_msg=f"{method} wrote an input")


def in_storage_dtype(method, args, dtype) -> tuple:
    """A recorded call's arguments with the arrays of the storage dtype (all but rois and the
    gradients, which are in the accumulation dtype) converted to ``dtype``."""
    forward = method.endswith("_forward")
    if forward:
        args[-2][...] = 0  # the op's uninitialised output: check_kernel_call poisons it anyway
    keep = [args[1]] if forward else [args[2], *gradient_arguments(method, args).values()]
    return tuple(
        a.astype(dtype, copy=False) if _is_array(a) and not any(a is k for k in keep) else a for a in args
    )


def check_kernels_write_every_element(kernels, case: RoICase, deterministic: bool = False) -> None:
    """The forward and the backward method (``deterministic``: its deterministic twin) of
    ``case.op`` on ``kernels`` (arrays moved to ``kernels.xp``), each called directly with the
    arguments the op prepares. The calls are recorded from the op on arrays of the accumulation
    dtype (the ops take float16 / bfloat16 on the GPU only) and replayed with the storage-dtype
    arrays in ``case``'s dtype."""
    xp = kernels.xp
    dtype = case.input.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    device_case = case.map_arrays(lambda a: xp.asarray(a.astype(acc) if a.dtype.itemsize < 4 else a))

    def backward(roi_case, module):
        return roi_case.backward(module, deterministic=deterministic)

    for run, expected in ((RoICase.forward, case.forward(reference)), (backward, case.backward(reference))):
        method, args = recorded_call(lambda: run(device_case, pydeform), xp)
        check_kernel_call(kernels, method, in_storage_dtype(method, args, dtype), expected)


def check_max_modes_propagate_nan(dtype, kernels=None, module=pydeform) -> None:
    """roi_pool and roi_align(mode="max") of ``module`` (run by ``kernels`` when given) on a bin
    whose channel 0 holds a larger value, then two NaN: the output is NaN, and the gradient goes
    to the first NaN in scan order (roi_pool: row-major pixels; roi_align: the (iy, ix) samples,
    here on pixels), as NumPy's argmax and max_pool2d's NaN rule; channel 1 (no NaN) is
    unaffected."""
    rng = np.random.default_rng(9)
    input = rng.uniform(0, 1, (1, 2, 4, 4)).astype(dtype)
    input[0, 0, 1, 1] = 2.0  # the first sample of roi_align, before the NaN ones
    input[0, 0, 1, 3] = input[0, 0, 3, 1] = np.nan
    # roi_pool's box spans every pixel; roi_align's 2 x 2 samples of its one bin lie on pixels
    # (1, 1), (1, 3), (3, 1), (3, 3).
    calls = {"roi_pool": (np.array([[0, 0, 0, 3, 3]], dtype), {}),
             "roi_align": (np.array([[0, 0, 0, 4, 4]], dtype), {"sampling_ratio": 2, "mode": "max"})}
    clean = input[0, 1]
    for op, (rois, options) in calls.items():
        samples = clean if op == "roi_pool" else clean[1::2, 1::2]
        context = (mock.patch.object(roi_module, "roi_kernels", lambda library, backend: kernels) if kernels
                   else contextlib.nullcontext())
        with context:
            output = to_numpy(getattr(module, op)(input, rois, 1, **options))
            grads = getattr(module, op + "_backward")(np.ones((1, 2, 1, 1), dtype), input, rois, 1, **options)
        grad_input = to_numpy(grads["input"] if isinstance(grads, dict) else grads.input)
        np.testing.assert_array_equal(output[0, :, 0, 0], [np.nan, samples.max()], err_msg=op)
        expected = np.zeros((2, 4, 4))
        expected[0, 1, 3] = 1.0
        expected[1][clean == samples.max()] = 1.0
        np.testing.assert_array_equal(grad_input[0], expected, err_msg=op)
