"""``python -m pydeform selftest``: check every op on every backend this machine can run.

The checks need nothing but pydeform and NumPy (the test suite's float64 reference is not
installed): agreement with a float64 run of the same backend, agreement of the GPU backends with
the Numba CPU backend in float64, finite-difference gradients, and special cases whose answer
NumPy computes directly: zero offsets and a unit mask give an ordinary convolution; RoI Align of
an affine image is the affine function at the bin centres (bilinear interpolation is exact on
it); RoI Pool of a ramp is the last pixel of each bin; position-sensitive pooling of a
channel-constant input returns each bin's channel; deformable RoI pooling with zero offsets is
aligned RoI Align, and its mask multiplies the output; CenterNet's decode of planted peaks
returns them in order with their boxes, its targets of hand-worked boxes fill the slots and put
1 at the centres, and its focal loss equals the formula.

Each op adds its checks with the :func:`check` decorator; the runner crosses every registered
check with every available backend and dtype it applies to and prints one table row per run.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np

from ._arrays import _CPU_DTYPES, _GPU_DTYPES
from .centernet import centernet_decode, centernet_focal_loss, centernet_focal_loss_backward, centernet_targets
from .deform_conv import deform_conv2d, deform_conv2d_backward
from . import roi as roi_ops

__all__ = [
    "CHECKS",
    "Backend",
    "Check",
    "OpCalls",
    "check",
    "discover_backends",
    "run_selftest",
]


class Backend(NamedTuple):
    """One way of running the ops: an array library plus the ops' ``backend=`` argument."""

    name: str
    xp: object  # numpy or cupy
    option: Optional[str]  # the ops' backend= argument
    dtypes: tuple

    @property
    def on_gpu(self) -> bool:
        return self.xp is not np

    def to_device(self, host: np.ndarray, dtype: str):
        return self.xp.asarray(host.astype(dtype_of(dtype)))

    def to_host(self, array) -> np.ndarray:
        """A float64 NumPy copy of ``array`` (any dtype, any device)."""
        host = array if isinstance(array, np.ndarray) else self.xp.asnumpy(array)
        return host.astype(np.float64)


def dtype_of(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # registers bfloat16 with NumPy

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


NUMBA_CPU = Backend("numba-cpu", np, None, _CPU_DTYPES)


def _gpu_problem() -> Optional[str]:
    """Why CuPy cannot run kernels here, or None when it can."""
    try:
        import cupy
    except ModuleNotFoundError:
        return 'CuPy not installed (the cuda12 or cuda13 extra brings it: pip install ".[cuda12]")'
    except Exception as error:  # e.g. a CuPy wheel for another CUDA major version
        return f"CuPy fails to import ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return f"no CUDA GPU ({error})"
    return None if count > 0 else "no CUDA GPU"


def discover_backends() -> tuple[list[Backend], dict[str, str]]:
    """The backends usable on this machine, and for each unusable one the reason."""
    backends, skipped = [NUMBA_CPU], {}
    problem = _gpu_problem()
    if problem is not None:
        # The Numba CUDA kernels run on CuPy arrays, so they need CuPy and a GPU too.
        return backends, {"cupy": problem, "numba-cuda": problem}
    import cupy

    backends.append(Backend("cupy", cupy, "cupy", _GPU_DTYPES))
    from .backends.numba_cuda import cuda

    if not cuda.is_available():
        skipped["numba-cuda"] = "Numba finds no usable CUDA GPU"
    elif not _nvvm_available():
        skipped["numba-cuda"] = "libNVVM not found (pip install nvidia-cuda-nvcc-cu12 or a CUDA toolkit)"
    else:
        backends.append(Backend("numba-cuda", cupy, "numba", _GPU_DTYPES))
    return backends, skipped


def _nvvm_available() -> bool:
    """Numba compiles CUDA kernels with libNVVM, which comes from a wheel or a CUDA toolkit."""
    try:
        from numba.cuda.cudadrv import nvvm
    except ImportError:
        return False
    return bool(nvvm.is_available())


# --- the registry --------------------------------------------------------------------------


class Check(NamedTuple):
    """One registered check: ``run(backend, dtype, quick)`` returns its max error."""

    op: str
    name: str
    tolerance: Mapping[str, float]  # by dtype name
    applies: Callable[[Backend, str], bool]
    run: Callable[[Backend, str, bool], float]


CHECKS: list[Check] = []


def every_run(backend: Backend, dtype: str) -> bool:
    return True


def below_float64(backend: Backend, dtype: str) -> bool:
    return dtype != "float64"


def float64_only(backend: Backend, dtype: str) -> bool:
    return dtype == "float64"


def gpu_only(backend: Backend, dtype: str) -> bool:
    return backend.on_gpu


def check(op: str, name: str, tolerance: Mapping[str, float], applies=every_run, registry=None):
    """Register the decorated ``run(backend, dtype, quick) -> max error`` as a check of ``op``.

    ``applies(backend, dtype)`` selects the runs it makes sense for; ``tolerance`` maps a dtype
    name to the largest error that passes. ``registry`` defaults to :data:`CHECKS`.
    """

    def register(run):
        (CHECKS if registry is None else registry).append(Check(op, name, tolerance, applies, run))
        return run

    return register


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest deviation relative to the largest magnitude of ``expected``."""
    scale = float(np.max(np.abs(expected), initial=0.0))
    deviation = float(np.max(np.abs(actual - expected), initial=0.0))
    return deviation / scale if scale > 0 else deviation


# Rounding the output to the storage type dominates for the half types (float32 accumulation).
OUTPUT_TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FINITE_DIFFERENCE_TOLERANCE = {"float64": 1e-6}


# --- running an op and the checks every op gets -----------------------------------------------


class OpCalls(NamedTuple):
    """What the generic checks need of one op.

    ``forward`` and ``backward`` are the public functions (``backward`` returns a NamedTuple of
    gradients, None for an absent argument); ``cases(quick)`` yields ``(case, arguments,
    grad_output)``: the float64 array arguments by name and a float64 output gradient, with the
    op's other keyword arguments in ``case.options()``.
    """

    op: str
    forward: Callable
    backward: Callable
    cases: Callable


def storage_dtype(name: str, dtype: str) -> str:
    """Boxes of half-type inputs are float32: image coordinates of a few hundred pixels are not
    representable in float16 / bfloat16."""
    return "float32" if name == "rois" and dtype in ("float16", "bfloat16") else dtype


def _rounded(arrays: dict, dtype: str) -> dict:
    """The arguments rounded to their storage type for ``dtype`` and held in float64, so runs in
    different dtypes see the same numbers."""
    return {k: v.astype(dtype_of(storage_dtype(k, dtype))).astype(np.float64) for k, v in arrays.items()}


def _on_device(backend, dtype, arrays: dict) -> dict:
    return {k: backend.to_device(v, storage_dtype(k, dtype)) for k, v in arrays.items()}


def run_forward(calls: OpCalls, backend, dtype, case, arrays) -> np.ndarray:
    output = calls.forward(**_on_device(backend, dtype, arrays), **case.options(), backend=backend.option)
    return backend.to_host(output)


def run_backward(calls: OpCalls, backend, dtype, case, arrays, grad_output) -> dict:
    grads = calls.backward(backend.to_device(grad_output, dtype), **_on_device(backend, dtype, arrays),
                           **case.options(), backend=backend.option)
    return {name: backend.to_host(g) for name, g in grads._asdict().items() if g is not None}


def _largest_gradient_error(actual: dict, expected: dict) -> float:
    return max(relative_error(actual[name], expected[name]) for name in expected)


def forward_check(calls: OpCalls, expected, prepare=None):
    """A check of the forward on each case's arguments, rounded to the dtype, against
    ``expected(backend, dtype, case, arguments)``, a float64 result. ``prepare(case, arguments)``
    returns the arguments to use instead, or None to pass over a case the check does not apply to
    (the first case of each op always applies: it is the one --quick runs)."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, _ in calls.cases(quick):
            if prepare is not None:
                arrays = prepare(case, arrays)
                if arrays is None:
                    continue
            arrays = _rounded(arrays, dtype)
            actual = run_forward(calls, backend, dtype, case, arrays)
            errors.append(relative_error(actual, expected(backend, dtype, case, arrays)))
        return max(errors)

    return run


def backward_check(calls: OpCalls, reference):
    """A check of every gradient against ``reference(backend)`` run in float64."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, grad_output in calls.cases(quick):
            arrays = _rounded(dict(arrays, grad_output=grad_output), dtype)
            grad_output = arrays.pop("grad_output")
            actual = run_backward(calls, backend, dtype, case, arrays, grad_output)
            expected = run_backward(calls, reference(backend), "float64", case, arrays, grad_output)
            errors.append(_largest_gradient_error(actual, expected))
        return max(errors)

    return run


def cases_of(cases, arrays_of):
    """``cases(quick)`` of :class:`OpCalls`: each case (the first alone when quick) with its
    arguments ``arrays_of(case, rng)`` and a random gradient of ``case.output_shape(arguments)``."""

    def generate(quick: bool):
        for index, case in enumerate(cases[:1] if quick else cases):
            rng = np.random.default_rng(index)
            arrays = arrays_of(case, rng)
            yield case, arrays, rng.standard_normal(case.output_shape(arrays))

    return generate


def _same_backend(backend):
    return backend


def _numba_cpu(backend):
    return NUMBA_CPU


def _float64_forward_of(calls: OpCalls, reference):
    return lambda backend, dtype, case, arrays: run_forward(calls, reference(backend), "float64", case, arrays)


# Small enough to stay inside one bilinear cell (the cases place every sample whose position
# depends on an argument at least 0.05 from a pixel edge); the forward is at most quadratic along
# any direction there, so the central difference has rounding error only.
FINITE_DIFFERENCE_STEP = 1e-5


def finite_difference_check(calls: OpCalls, argument: str):
    """d loss / d argument along a random direction, loss = sum(grad_output * out), for every
    case that has the argument."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, grad_output in calls.cases(quick):
            if argument not in arrays:
                continue
            rng = np.random.default_rng(len(argument))
            direction = rng.standard_normal(arrays[argument].shape)

            def loss(step):
                moved = dict(arrays, **{argument: arrays[argument] + step * direction})
                return float(np.sum(grad_output * run_forward(calls, backend, dtype, case, moved)))

            h = FINITE_DIFFERENCE_STEP
            numeric = (loss(h) - loss(-h)) / (2 * h)
            gradient = run_backward(calls, backend, dtype, case, arrays, grad_output)[argument]
            analytic = float(np.sum(gradient * direction))
            # Relative to the sum of the magnitudes of its terms, which cancellation cannot shrink.
            scale = float(np.sum(np.abs(gradient * direction)))
            errors.append(abs(numeric - analytic) / scale if scale > 0 else abs(numeric - analytic))
        return max(errors)

    return run


def register_common_checks(calls: OpCalls, gradients):
    """Forward and backward against a float64 run of the same backend and, on a GPU, of the Numba
    CPU backend; each gradient named in ``gradients`` against finite differences in float64."""
    op = calls.op
    check(op, "forward vs float64", OUTPUT_TOLERANCE, below_float64)(
        forward_check(calls, _float64_forward_of(calls, _same_backend)))
    check(op, "backward vs float64", OUTPUT_TOLERANCE, below_float64)(backward_check(calls, _same_backend))
    check(op, "forward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(
        forward_check(calls, _float64_forward_of(calls, _numba_cpu)))
    check(op, "backward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(backward_check(calls, _numba_cpu))
    for argument in gradients:
        check(op, f"grad {argument} vs finite difference", FINITE_DIFFERENCE_TOLERANCE, float64_only)(
            finite_difference_check(calls, argument))


# --- deform_conv2d ---------------------------------------------------------------------------


class DeformConvCase(NamedTuple):
    n: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    offset_groups: int

    def options(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def out_size(self) -> tuple:
        return tuple(
            (size + 2 * pad - (dil * (k - 1) + 1)) // step + 1
            for size, pad, dil, k, step in zip(
                (self.height, self.width), self.padding, self.dilation, self.kernel, self.stride
            )
        )

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.out_channels, *self.out_size())

    def arrays(self, rng: np.random.Generator) -> dict:
        """float64 arguments; every sampling position is a whole number plus a fraction in
        [0.05, 0.95], so no sample sits on a pixel edge where the forward has a kink."""
        kh, kw = self.kernel
        out_h, out_w = self.out_size()
        points = self.offset_groups * kh * kw
        offset_shape = (self.n, 2 * points, out_h, out_w)
        whole = rng.integers(-2, 2, size=offset_shape)
        return {
            "input": rng.standard_normal((self.n, self.channels, self.height, self.width)),
            "offset": whole + rng.uniform(0.05, 0.95, size=offset_shape),
            "weight": rng.standard_normal((self.out_channels, self.channels // self.groups, kh, kw)),
            "bias": rng.standard_normal(self.out_channels),
            "mask": rng.uniform(0.1, 1.0, size=(self.n, points, out_h, out_w)),
        }


# The first case covers strides, dilation, padding, weight and offset groups; --quick runs it alone.
DEFORM_CONV_CASES = (
    DeformConvCase(2, 6, 9, 8, 4, (3, 2), (2, 1), (1, 0), (1, 2), groups=2, offset_groups=3),
    DeformConvCase(2, 4, 7, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), groups=1, offset_groups=1),
)
DEFORM_CONV_GRADIENTS = ("input", "offset", "weight", "bias", "mask")


_deform_conv_cases = cases_of(DEFORM_CONV_CASES, DeformConvCase.arrays)
DEFORM_CONV = OpCalls("deform_conv2d", deform_conv2d, deform_conv2d_backward, _deform_conv_cases)


def _contract(samples, weight, bias) -> np.ndarray:
    """out[n, o, y, x] = bias[o] + sum over o's group's channels c and kernel points of
    weight[o, c, i, j] * samples[n, c, i, j, y, x]."""
    n, channels, kh, kw, out_h, out_w = samples.shape
    out_channels, group_channels = weight.shape[:2]
    groups = channels // group_channels
    samples = samples.reshape(n, groups, group_channels, kh, kw, out_h, out_w)
    grouped_weight = weight.reshape(groups, out_channels // groups, group_channels, kh, kw)
    out = np.einsum("ngcijyx,gocij->ngoyx", samples, grouped_weight)
    return out.reshape(n, out_channels, out_h, out_w) + bias.reshape(1, -1, 1, 1)


def ordinary_conv2d(input, weight, bias, stride, padding, dilation) -> np.ndarray:
    """A grouped 2-D convolution (cross-correlation) with zero padding, from sliding windows."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[2:]
    padded = np.pad(input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [n, c, Ho, Wo, kh, kw]
    return _contract(windows.transpose(0, 1, 4, 5, 2, 3), weight, bias)


def whole_pixel_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation) -> np.ndarray:
    """deform_conv2d for offsets that are whole numbers, where bilinear sampling reads single
    pixels: a gather from the zero-padded input."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, channels = input.shape[:2]
    kh, kw = weight.shape[2:]
    out_h, out_w = offset.shape[2:]
    offset_groups = offset.shape[1] // (2 * kh * kw)
    shifts = offset.astype(np.int64).reshape(n, offset_groups, kh, kw, 2, out_h, out_w)
    reach = int(np.abs(shifts).max())
    padded = np.pad(input, ((0, 0), (0, 0), (ph + reach,) * 2, (pw + reach,) * 2))
    padded = padded.reshape(n, offset_groups, channels // offset_groups, *padded.shape[2:])
    # Row / column of each sample in the padded input: [n, Goff, kh, kw, Ho, Wo].
    rows = (np.arange(out_h)[:, None] * sh + (np.arange(kh) * dh)[:, None, None, None]
            + shifts[:, :, :, :, 0] + reach)
    cols = np.arange(out_w) * sw + (np.arange(kw) * dw)[:, None, None] + shifts[:, :, :, :, 1] + reach
    index = np.ogrid[:n, :offset_groups, : channels // offset_groups]
    samples = padded[
        index[0][..., None, None, None, None], index[1][..., None, None, None, None],
        index[2][..., None, None, None, None], rows[:, :, None], cols[:, :, None],
    ]  # [n, Goff, C/Goff, kh, kw, Ho, Wo]
    samples = samples * mask.reshape(n, offset_groups, 1, kh, kw, out_h, out_w)
    return _contract(samples.reshape(n, channels, kh, kw, out_h, out_w), weight, bias)




def _zero_offsets_unit_mask(case, arrays):
    return dict(arrays, offset=np.zeros_like(arrays["offset"]), mask=np.ones_like(arrays["mask"]))


def _whole_pixel_offsets(case, arrays):
    return dict(arrays, offset=np.floor(arrays["offset"]))


check("deform_conv2d", "zero offsets = convolution", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_CONV,
    lambda backend, dtype, case, a: ordinary_conv2d(a["input"], a["weight"], a["bias"], **case.options()),
    prepare=_zero_offsets_unit_mask,
))
check("deform_conv2d", "whole-pixel offsets = gather", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_CONV,
    lambda backend, dtype, case, arrays: whole_pixel_deform_conv2d(**arrays, **case.options()),
    prepare=_whole_pixel_offsets,
))


@check("deform_conv2d", "mask=None = unit mask", OUTPUT_TOLERANCE)
def _no_mask_is_a_unit_mask(backend, dtype, quick):
    errors = []
    for case, arrays, grad_output in _deform_conv_cases(quick):
        arrays = _rounded(arrays, dtype)
        unit = dict(arrays, mask=np.ones_like(arrays["mask"]))
        absent = {k: v for k, v in arrays.items() if k != "mask"}
        errors.append(
            relative_error(
                run_forward(DEFORM_CONV, backend, dtype, case, absent),
                run_forward(DEFORM_CONV, backend, dtype, case, unit),
            )
        )
        unit_grads = run_backward(DEFORM_CONV, backend, dtype, case, unit, grad_output)
        del unit_grads["mask"]
        errors.append(
            _largest_gradient_error(run_backward(DEFORM_CONV, backend, dtype, case, absent, grad_output), unit_grads)
        )
    return max(errors)


register_common_checks(DEFORM_CONV, DEFORM_CONV_GRADIENTS)


# --- RoI ops ---------------------------------------------------------------------------------
#
# Box corners lie on a 1/16-pixel grid of the feature map and spatial scales are powers of two, so
# boxes, roi sizes and adaptive sample counts are exact in every dtype: runs in different dtypes
# sample at the same places. Each case has INSIDE_ROIS boxes inside the map first; the roi_align /
# roi_pool families add boxes reaching past the borders and one of zero height.

INSIDE_ROIS = 4
BOX_GRID = 16


class RoICase(NamedTuple):
    """One geometry of a RoI op.

    map_shape: the input's (N, C, H, W); channels_out, pooled: the output's channels and (PH, PW);
    keywords: the op's other arguments as (name, value) pairs; arguments: (name, value) pairs
    saying which optional arrays the case passes (read by the op's argument builder).
    """

    map_shape: tuple
    channels_out: int
    pooled: tuple
    keywords: tuple
    arguments: tuple = ()

    def options(self) -> dict:
        return dict(self.keywords)

    def output_shape(self, arrays) -> tuple:
        return (len(arrays["rois"]), self.channels_out, *self.pooled)


def _roi_case(map_shape, pooled, channels_out=None, arguments=(), **keywords):
    """A case of an op whose output size is its ``output_size`` argument."""
    channels_out = map_shape[1] if channels_out is None else channels_out
    return RoICase(map_shape, channels_out, pooled, tuple(dict(output_size=pooled, **keywords).items()),
                   tuple(dict(arguments).items()))


def roi_calls(op, cases, arrays_of):
    """The OpCalls of RoI op ``op`` (``pydeform.<op>`` and ``<op>_backward``)."""
    return OpCalls(op, getattr(roi_ops, op), getattr(roi_ops, f"{op}_backward"), cases_of(cases, arrays_of))


def identity_check(calls, name, expected, prepare):
    """Register a forward check against a NumPy answer (see :func:`forward_check`)."""
    check(calls.op, name, OUTPUT_TOLERANCE)(forward_check(calls, expected, prepare))


def affine_answer(channels_of, positions_of):
    """The expected output on an affine image: its value in the input channels
    ``channels_of(case)`` read by each output element, at ``positions_of(case, arguments)``."""
    return lambda backend, dtype, case, arrays: _affine_at(case, arrays, channels_of(case),
                                                           *positions_of(case, arrays))


def _on_box_grid(rng, low, high, size):
    """Uniform draws from the multiples of 1/BOX_GRID in [low, high] (arrays broadcast)."""
    return rng.integers(np.ceil(np.multiply(low, BOX_GRID)), np.floor(np.multiply(high, BOX_GRID)) + 1,
                        size) / BOX_GRID


def inside_boxes(rng, count, height, width):
    """[count, 4] feature-map boxes (x1, y1, x2, y2), at least 1.5 pixels wide and high, within
    [0.5, size - 1.5]: roi_align samples them inside [0, size - 1] aligned or not, and roi_pool's
    rounded boxes and bins lie inside the map."""
    sizes = np.array([width, height])
    sides = _on_box_grid(rng, 1.5, 0.75 * (sizes - 2), (count, 2))
    starts = _on_box_grid(rng, 0.5, sizes - 1.5 - sides, (count, 2))
    return np.concatenate([starts, starts + sides], axis=1)


def border_boxes(height, width):
    """Feature-map boxes past the top-left and past the bottom-right border, and one of zero
    height."""
    return np.array([[-2.25, -1.75, 3.125, 4.5],
                     [width - 3.0, height - 2.5, width + 2.0, height + 1.5],
                     [4.0, 2.5, 6.5, 2.5]])


def _rois(rng, case, feature_boxes):
    """[K, 5] rois in image coordinates from feature-map boxes, with random batch indices."""
    scale = case.options()["spatial_scale"]
    return np.column_stack([rng.integers(0, case.map_shape[0], len(feature_boxes)), feature_boxes / scale])


def _ramp(case):
    """input[n, c, y, x] = W*y + x: whole numbers below 256 (maps of at most 256 pixels), exact
    in every dtype, strictly increasing in row-major order."""
    n, channels, height, width = case.map_shape
    ramp = width * np.arange(height)[:, None] + np.arange(width)
    return np.broadcast_to(ramp, case.map_shape).astype(np.float64)


def _plain_roi_arrays(case, rng):
    """input and rois of roi_align / roi_pool and their position-sensitive variants. The input's
    values are random, hence distinct: no two samples of a bin tie for the max unless they read
    the same place (then every run picks the first)."""
    n, channels, height, width = case.map_shape
    boxes = np.concatenate([inside_boxes(rng, INSIDE_ROIS, height, width), border_boxes(height, width)])
    return {"input": rng.standard_normal(case.map_shape), "rois": _rois(rng, case, boxes)}


def _batch(arrays):
    return arrays["rois"][:, 0].astype(np.int64)


def _inside(arrays, **replaced):
    """The arguments for the inside boxes alone, with some arguments replaced."""
    kept = {name: value[:INSIDE_ROIS] if name != "input" else value for name, value in arrays.items()}
    return dict(kept, **replaced)


def _affine_coefficients(case):
    """(a, b, d), each [N, C]: multiples of 1/4 whose image a*x + b*y + d is exact in every dtype."""
    n, channels = case.map_shape[:2]
    index = np.arange(n * channels).reshape(n, channels)
    return 0.25 * (1 + index % 3) * (-1.0) ** index, 0.5 - 0.25 * (index % 4), index - 2.0


def _affine_image(case):
    a, b, d = (v[:, :, None, None] for v in _affine_coefficients(case))
    height, width = case.map_shape[2:]
    return a * np.arange(width) + b * np.arange(height)[:, None] + d


def _affine_at(case, arrays, channels, y, x):
    """The affine image of each roi's image at y, x ([K, C_out or 1, PH or 1, PW or 1]), in input
    channels ``channels`` (broadcast against [C_out, PH, PW]): [K, C_out, PH, PW]."""
    a, b, d = (v[_batch(arrays)][:, channels] for v in _affine_coefficients(case))
    return a * x + b * y + d


def _own_channels(case):
    return np.arange(case.map_shape[1])[:, None, None]


def _cell_channels(case):
    """Position-sensitive RoI Align / Pool: bin (ph, pw) of output channel c reads input channel
    (c*PH + ph)*PW + pw, the C-order flattening of [C_out, PH, PW]."""
    return np.arange(case.map_shape[1]).reshape(case.channels_out, *case.pooled)


def _scaled_boxes(case, arrays, shift):
    """x1, y1 and the roi width and height on the feature map, corners moved by ``shift``: [K] each."""
    x1, y1, x2, y2 = (arrays["rois"][:, 1:] * case.options()["spatial_scale"] - shift).T
    return x1, y1, x2 - x1, y2 - y1


def _bin_centres(case, arrays, aligned):
    """roi_align's bin centres: y [K, 1, PH, 1], x [K, 1, 1, PW]."""
    pooled_h, pooled_w = case.pooled
    x1, y1, width, height = _scaled_boxes(case, arrays, 0.5 if aligned else 0.0)
    if not aligned:
        width, height = np.maximum(width, 1.0), np.maximum(height, 1.0)
    y = y1[:, None] + (np.arange(pooled_h) + 0.5) * (height / pooled_h)[:, None]
    x = x1[:, None] + (np.arange(pooled_w) + 0.5) * (width / pooled_w)[:, None]
    return y[:, None, :, None], x[:, None, None, :]


def _average_mode_affine(case, arrays):
    return None if case.options()["mode"] == "max" else _inside(arrays, input=_affine_image(case))


def _channel_constant(case, arrays):
    """Each channel of each image constant (its top-left value), inside boxes."""
    return _inside(arrays, input=np.broadcast_to(arrays["input"][:, :, :1, :1], case.map_shape).copy())


def _position_sensitive_constants(backend, dtype, case, arrays):
    return arrays["input"][_batch(arrays), :, 0, 0][:, _cell_channels(case)]


ROI_ALIGN_CASES = (
    _roi_case((2, 3, 12, 14), (3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True, mode="avg"),
    _roi_case((2, 3, 10, 12), (2, 2), spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"),
    _roi_case((1, 2, 12, 12), (2, 3), spatial_scale=0.25, sampling_ratio=0, aligned=True, mode="max"),
    _roi_case((2, 2, 9, 11), (2, 2), spatial_scale=0.5, sampling_ratio=2, aligned=False, mode="max"),
)
ROI_ALIGN = roi_calls("roi_align", ROI_ALIGN_CASES, _plain_roi_arrays)
identity_check(ROI_ALIGN, "affine image = affine at bin centres", affine_answer(
    _own_channels, lambda case, arrays: _bin_centres(case, arrays, case.options()["aligned"])),
    _average_mode_affine)
register_common_checks(ROI_ALIGN, ("input",))

PS_ROI_ALIGN_CASES = (
    _roi_case((2, 12, 12, 14), (2, 3), channels_out=2, spatial_scale=0.5, sampling_ratio=2),
    _roi_case((1, 4, 10, 10), (2, 2), channels_out=1, spatial_scale=1.0, sampling_ratio=-1),
)
PS_ROI_ALIGN = roi_calls("ps_roi_align", PS_ROI_ALIGN_CASES, _plain_roi_arrays)
identity_check(PS_ROI_ALIGN, "channel-constant input = its channels", _position_sensitive_constants,
               _channel_constant)
identity_check(PS_ROI_ALIGN, "affine image = affine at bin centres", affine_answer(
    _cell_channels, lambda case, arrays: _bin_centres(case, arrays, aligned=True)),
    lambda case, arrays: _inside(arrays, input=_affine_image(case)))
register_common_checks(PS_ROI_ALIGN, ("input",))


def pool_bins(case, arrays, extra):
    """roi_pool's bins (``extra=1``, a rounded box of xe - xs + 1 pixels) or ps_roi_pool's
    (``extra=0``): rows [hstart, hend) [K, PH] and columns [wstart, wend) [K, PW], clipped to the map."""
    scaled = arrays["rois"][:, 1:] * case.options()["spatial_scale"]
    start_x, start_y, end_x, end_y = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64).T

    def axis(start, end, pooled, size):
        length = np.maximum(end - start + extra, 1)[:, None]
        index = np.arange(pooled)
        low = index * length // pooled + start[:, None]
        high = -(-(index + 1) * length // pooled) + start[:, None]
        return np.clip(low, 0, size), np.clip(high, 0, size)

    height, width = case.map_shape[2:]
    return axis(start_y, end_y, case.pooled[0], height), axis(start_x, end_x, case.pooled[1], width)


def _ramp_inside(case, arrays):
    return _inside(arrays, input=_ramp(case))


def _ramp_last_pixels(backend, dtype, case, arrays):
    """The max of the ramp over a bin is its last pixel, row hend - 1 and column wend - 1."""
    (_, row_end), (_, column_end) = pool_bins(case, arrays, extra=1)
    width = case.map_shape[3]
    last = width * (row_end - 1)[:, :, None] + (column_end - 1)[:, None, :]
    return np.broadcast_to(last[:, None], case.output_shape(arrays))


def _ramp_bin_centres(backend, dtype, case, arrays):
    """The average of the ramp over a bin is its value at the bin's centre."""
    (row_start, row_end), (column_start, column_end) = pool_bins(case, arrays, extra=0)
    width = case.map_shape[3]
    centre = width * ((row_start + row_end - 1) / 2)[:, :, None] + ((column_start + column_end - 1) / 2)[:, None, :]
    return np.broadcast_to(centre[:, None], case.output_shape(arrays))


ROI_POOL_CASES = (
    _roi_case((2, 3, 12, 14), (3, 2), spatial_scale=0.5),
    _roi_case((2, 2, 10, 12), (2, 2), spatial_scale=1.0),
)
ROI_POOL = roi_calls("roi_pool", ROI_POOL_CASES, _plain_roi_arrays)
identity_check(ROI_POOL, "ramp image = last pixel of each bin", _ramp_last_pixels, _ramp_inside)
register_common_checks(ROI_POOL, ("input",))

PS_ROI_POOL_CASES = (
    _roi_case((2, 12, 12, 14), (2, 3), channels_out=2, spatial_scale=0.5),
    _roi_case((1, 4, 10, 10), (2, 2), channels_out=1, spatial_scale=1.0),
)
PS_ROI_POOL = roi_calls("ps_roi_pool", PS_ROI_POOL_CASES, _plain_roi_arrays)
identity_check(PS_ROI_POOL, "channel-constant input = its channels", _position_sensitive_constants,
               _channel_constant)
identity_check(PS_ROI_POOL, "ramp image = ramp at bin centres", _ramp_bin_centres, _ramp_inside)
register_common_checks(PS_ROI_POOL, ("input",))


def _off_edge_shifts(rng, start, shape):
    """Shifts of less than 2 pixels that move positions ``start`` (broadcast to ``shape``) to a
    whole number plus a fraction in [0.05, 0.95], away from the kinks of bilinear sampling."""
    target = np.floor(start) + rng.integers(-1, 2, shape) + rng.uniform(0.05, 0.95, shape)
    return target - start


# deform_roi_pool's boxes are 2 pixels per bin, sampled 2 x 2 (sampling_ratio 2 or adaptive): one
# pixel between samples, so one shift per bin places all of its samples off the pixel edges.
DEFORM_BIN_PIXELS = 2


def _deform_roi_pool_arrays(case, rng):
    """Inside boxes whose samples, moved by the offsets, stay at least 0.05 from pixel edges and
    inside [0, size - 1]; the mask in [0.1, 1]."""
    options, wanted = case.options(), dict(case.arguments)
    n, channels, height, width = case.map_shape
    sides = DEFORM_BIN_PIXELS * np.array(case.pooled[::-1])  # (x, y)
    # Box corners after the half-pixel shift, 2.5 pixels from the borders: shifts are < 2 pixels.
    starts = _on_box_grid(rng, 2.5, np.array([width, height]) - 3.5 - sides, (INSIDE_ROIS, 2))
    arrays = {"input": rng.standard_normal(case.map_shape),
              "rois": _rois(rng, case, np.concatenate([starts, starts + sides], axis=1) + 0.5)}
    shape = (INSIDE_ROIS, *case.pooled)
    if wanted["offset"]:
        # First samples of each bin: x1' + pw * 2 + 0.5 (likewise y).
        first_x = (starts[:, 0, None] + DEFORM_BIN_PIXELS * np.arange(case.pooled[1]) + 0.5)[:, None, :]
        first_y = (starts[:, 1, None] + DEFORM_BIN_PIXELS * np.arange(case.pooled[0]) + 0.5)[:, :, None]
        gain = options["gamma"] * sides
        arrays["offset"] = np.stack([_off_edge_shifts(rng, first_x, shape) / gain[0],
                                     _off_edge_shifts(rng, first_y, shape) / gain[1]], axis=1)
    if wanted["mask"]:
        arrays["mask"] = rng.uniform(0.1, 1.0, (INSIDE_ROIS, 1, *case.pooled))
    return arrays


def _deform_bin_centres(case, arrays):
    """Bin centres moved by the offsets: y, x [K, 1, PH, PW]."""
    x1, y1, width, height = _scaled_boxes(case, arrays, 0.5)
    pooled_h, pooled_w = case.pooled
    gamma = case.options()["gamma"]
    offset = arrays.get("offset", np.zeros((len(x1), 2, pooled_h, pooled_w)))
    y = (y1[:, None] + (np.arange(pooled_h) + 0.5) * (height / pooled_h)[:, None])[:, :, None]
    x = (x1[:, None] + (np.arange(pooled_w) + 0.5) * (width / pooled_w)[:, None])[:, None, :]
    moved_y = y + gamma * height[:, None, None] * offset[:, 1]
    moved_x = x + gamma * width[:, None, None] * offset[:, 0]
    return moved_y[:, None], moved_x[:, None]


def _moved_affine(backend, dtype, case, arrays):
    expected = affine_answer(_own_channels, _deform_bin_centres)(backend, dtype, case, arrays)
    return expected * arrays["mask"] if "mask" in arrays else expected


def _affine_input(case, arrays):
    return dict(arrays, input=_affine_image(case))


def _zero_offsets_no_mask(case, arrays):
    kept = {name: value for name, value in arrays.items() if name != "mask"}
    return dict(kept, offset=np.zeros((len(arrays["rois"]), 2, *case.pooled)))


def _aligned_roi_align(backend, dtype, case, arrays):
    options = case.options()
    align_case = _roi_case(case.map_shape, case.pooled, spatial_scale=options["spatial_scale"],
                           sampling_ratio=options["sampling_ratio"], aligned=True)
    return run_forward(ROI_ALIGN, backend, dtype, align_case, {"input": arrays["input"], "rois": arrays["rois"]})


def _with_mask(case, arrays):
    count = len(arrays["rois"]) * case.pooled[0] * case.pooled[1]
    return dict(arrays, mask=arrays.get("mask", np.linspace(0.2, 1.0, count).reshape(-1, 1, *case.pooled)))


def _unmasked_times_mask(backend, dtype, case, arrays):
    unmasked = {name: value for name, value in arrays.items() if name != "mask"}
    return run_forward(DEFORM_ROI_POOL, backend, dtype, case, unmasked) * arrays["mask"]


DEFORM_ROI_POOL_CASES = (
    _roi_case((2, 3, 12, 14), (2, 3), arguments=dict(offset=True, mask=True), spatial_scale=0.5,
              sampling_ratio=2, gamma=0.1),
    _roi_case((1, 2, 10, 10), (2, 2), arguments=dict(offset=True, mask=False), spatial_scale=1.0,
              sampling_ratio=0, gamma=0.2),
    _roi_case((2, 2, 12, 12), (3, 2), arguments=dict(offset=False, mask=True), spatial_scale=0.25,
              sampling_ratio=2, gamma=0.1),
)
DEFORM_ROI_POOL = roi_calls("deform_roi_pool", DEFORM_ROI_POOL_CASES, _deform_roi_pool_arrays)
identity_check(DEFORM_ROI_POOL, "zero offsets = roi_align aligned", _aligned_roi_align, _zero_offsets_no_mask)
identity_check(DEFORM_ROI_POOL, "mask = unmasked * mask", _unmasked_times_mask, _with_mask)
identity_check(DEFORM_ROI_POOL, "affine image = affine at moved centres", _moved_affine, _affine_input)
register_common_checks(DEFORM_ROI_POOL, ("input", "offset", "mask"))


def _deform_psroi_pool_arrays(case, rng):
    """Boxes of sample_per_part pixels per bin (one pixel between samples), inside the map, and
    trans (when the case has classes) moving every sample at least 0.05 from pixel edges."""
    options, classes = case.options(), dict(case.arguments)["classes"]
    scale, pooled = options["spatial_scale"], options["pooled_size"]
    part = options["part_size"] or pooled
    side = pooled * options["sample_per_part"]  # roi size on the map: (round(x2) + 1 - round(x1)) * scale
    height, width = case.map_shape[2:]
    # round(x1) = start; the first sample x1' = start * scale - 0.5 lies >= 2.5 from the border.
    starts = np.column_stack([rng.integers(np.ceil(3 / scale), np.floor((size - 2.5 - side) / scale) + 1,
                                           INSIDE_ROIS) for size in (width, height)])
    boxes = np.concatenate([starts, starts + side / scale - 1], axis=1) + 0.25
    arrays = {"input": rng.standard_normal(case.map_shape),
              "rois": np.column_stack([rng.integers(0, case.map_shape[0], INSIDE_ROIS), boxes])}
    if classes:
        first = starts * scale - 0.5  # [K, 2] (x, y); bins and samples are whole pixels apart
        shape = (INSIDE_ROIS, classes, part, part)
        shift_x = _off_edge_shifts(rng, first[:, 0, None, None, None], shape)
        shift_y = _off_edge_shifts(rng, first[:, 1, None, None, None], shape)
        trans = np.stack([shift_x, shift_y], axis=2) / (options["trans_std"] * side)
        arrays["trans"] = trans.reshape(INSIDE_ROIS, 2 * classes, part, part)
    return arrays


def _psroi_channels(case):
    """Bin (ph, pw) of output channel c reads input channel (c*gs + gh)*gs + gw with group cell
    gh = floor(ph*gs/P): [C_out, P, P]."""
    options = case.options()
    group, pooled = options["group_size"], options["pooled_size"]
    cell = np.arange(pooled) * group // pooled
    return (np.arange(case.channels_out)[:, None, None] * group + cell[:, None]) * group + cell


def _psroi_group_constants(backend, dtype, case, arrays):
    return arrays["input"][_batch(arrays), :, 0, 0][:, _psroi_channels(case)]


def _psroi_sample_means(case, arrays):
    """The mean sample position of each bin, y and x [K, C_out, P, P]: the bin's first sample
    moved by its class's trans at its part cell, plus (sample_per_part - 1) / 2 steps."""
    options = case.options()
    scale, pooled, samples = options["spatial_scale"], options["pooled_size"], options["sample_per_part"]
    part = options["part_size"] or pooled
    corners = arrays["rois"][:, 1:]
    rounded = np.sign(corners) * np.floor(np.abs(corners) + 0.5)
    x1, y1 = (rounded[:, :2] * scale - 0.5).T
    width, height = (np.maximum((rounded[:, 2:] + 1) * scale - 0.5 - rounded[:, :2] * scale + 0.5, 0.1)).T
    bins = np.arange(pooled)
    y = y1[:, None] + bins * (height / pooled)[:, None] + (samples - 1) / 2 * (height / pooled / samples)[:, None]
    x = x1[:, None] + bins * (width / pooled)[:, None] + (samples - 1) / 2 * (width / pooled / samples)[:, None]
    y, x = y[:, None, :, None], x[:, None, None, :]
    if "trans" in arrays:
        trans = arrays["trans"]
        classes = trans.shape[1] // 2
        class_of = np.arange(case.channels_out) // (case.channels_out // classes)
        cells = bins * part // pooled
        # [K, C_out, P, P]: the (x, y) trans of each output channel's class at each bin's part cell.
        at_bins = trans.reshape(len(trans), classes, 2, part, part)[:, class_of][:, :, :, cells][:, :, :, :, cells]
        y = y + at_bins[:, :, 1] * options["trans_std"] * height[:, None, None, None]
        x = x + at_bins[:, :, 0] * options["trans_std"] * width[:, None, None, None]
    return y, x


def _psroi_case(map_shape, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                spatial_scale, classes):
    keywords = dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size, part_size=part_size,
                    sample_per_part=sample_per_part, trans_std=trans_std, spatial_scale=spatial_scale)
    return RoICase(map_shape, output_dim, (pooled_size, pooled_size), tuple(keywords.items()),
                   (("classes", classes),))


DEFORM_PSROI_POOL_CASES = (
    _psroi_case((2, 16, 14, 16), 4, 2, 3, 3, 2, trans_std=0.1, spatial_scale=1.0, classes=2),
    _psroi_case((1, 18, 16, 16), 2, 3, 3, 2, 2, trans_std=0.2, spatial_scale=0.5, classes=1),
    _psroi_case((2, 8, 14, 16), 2, 2, 2, 0, 3, trans_std=0.1, spatial_scale=1.0, classes=0),
)
DEFORM_PSROI_POOL = roi_calls("deform_psroi_pool", DEFORM_PSROI_POOL_CASES, _deform_psroi_pool_arrays)
identity_check(DEFORM_PSROI_POOL, "channel-constant input = its channels", _psroi_group_constants, _channel_constant)
identity_check(DEFORM_PSROI_POOL, "affine image = affine at moved sample means",
               affine_answer(_psroi_channels, _psroi_sample_means), _affine_input)
register_common_checks(DEFORM_PSROI_POOL, ("input", "trans"))


# --- CenterNet ---------------------------------------------------------------------------------
#
# Heat values lie on a 1/64 grid in [0, 1), exact in every dtype (bfloat16 keeps 8 significant
# bits), so runs in different dtypes rank the same scores. Planted peaks take values in [1/2, 1)
# on a lattice 3 pixels apart: each is the strict maximum of its 3x3 window and above every
# background value (< 1/4), so the top-K are the planted peaks in decreasing order.

HEAT_GRID = 64
CENTERNET_SHAPE = (2, 3, 9, 12)  # B, C, H, W


def _centernet_heat(rng, planted: bool):
    """(heat, peaks): background on the grid in [0, 1/4); with ``planted``, one peak per lattice
    point of each image, (b, value, c, y, x) rows in decreasing value order per image."""
    batch, classes, height, width = CENTERNET_SHAPE
    heat = rng.integers(0, HEAT_GRID // 4, CENTERNET_SHAPE) / HEAT_GRID
    peaks = []
    if planted:
        sites = [(c, y, x) for c in range(classes) for y in range(1, height, 3) for x in range(1, width, 3)]
        for b in range(batch):
            values = (HEAT_GRID // 2 + rng.permutation(HEAT_GRID // 2)[:len(sites)]) / HEAT_GRID
            for value, (c, y, x) in sorted(zip(values, sites), reverse=True):
                heat[b, c, y, x] = value
                peaks.append((b, value, c, y, x))
    return heat, peaks


def _centernet_decode_arrays(rng, planted):
    batch, classes, height, width = CENTERNET_SHAPE
    heat, peaks = _centernet_heat(rng, planted)
    arrays = {"heat": heat, "wh": rng.uniform(1.0, 9.0, (batch, 2 * classes, height, width)),
              "reg": rng.uniform(0.0, 1.0, (batch, 2, height, width))}
    return arrays, peaks


def _decode(backend, dtype, arrays, **options):
    """(float64 detections of ``backend`` in ``dtype`` on the arguments rounded to it, the
    rounded arguments)."""
    arrays = _rounded(arrays, dtype)
    out = centernet_decode(**_on_device(backend, dtype, arrays), **options, backend=backend.option)
    return backend.to_host(out), arrays


def _detections_error(actual, expected) -> float:
    """Relative box error; infinite when a score or class differs (those are exact)."""
    if not np.array_equal(actual[..., 4:], expected[..., 4:]):
        return float("inf")
    return relative_error(actual[..., :4], expected[..., :4])


DECODE_OPTIONS = ({"K": 30, "cat_spec_wh": True, "down_ratio": 4.0},
                  {"K": 500, "kernel": 5, "threshold": 0.3})


@check("centernet_decode", "planted peaks = top-K", OUTPUT_TOLERANCE)
def _planted_peaks(backend, dtype, quick):
    arrays, peaks = _centernet_decode_arrays(np.random.default_rng(40), planted=True)
    batch = CENTERNET_SHAPE[0]
    k = len(peaks) // batch
    actual, arrays = _decode(backend, dtype, arrays, K=k, cat_spec_wh=True, down_ratio=2.0)
    expected = np.zeros((batch, k, 6))
    for row, (b, value, c, y, x) in enumerate(peaks):
        xs, ys = x + arrays["reg"][b, 0, y, x], y + arrays["reg"][b, 1, y, x]
        w, h = arrays["wh"][b, 2 * c, y, x], arrays["wh"][b, 2 * c + 1, y, x]
        expected[b, row % k] = (2 * (xs - w / 2), 2 * (ys - h / 2), 2 * (xs + w / 2), 2 * (ys + h / 2), value, c)
    return _detections_error(actual, expected)


def _decode_against(reference_backend):
    def run(backend, dtype, quick):
        errors = []
        for index, options in enumerate(DECODE_OPTIONS[:1] if quick else DECODE_OPTIONS):
            arrays, _ = _centernet_decode_arrays(np.random.default_rng(41 + index), planted=index == 0)
            if not options.get("cat_spec_wh"):
                arrays["wh"] = arrays["wh"][:, :2]
            actual, rounded = _decode(backend, dtype, arrays, **options)
            expected, _ = _decode(reference_backend(backend), "float64", rounded, **options)
            errors.append(_detections_error(actual, expected))
        return max(errors)

    return run


check("centernet_decode", "vs float64", OUTPUT_TOLERANCE, below_float64)(_decode_against(_same_backend))
check("centernet_decode", "vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(_decode_against(_numba_cpu))


def _boxes_dtype(backend, dtype):
    """The targets take float32 or float64 boxes."""
    return dtype in ("float32", "float64")


# Boxes in input pixels (down_ratio 4) on a 16 x 20 grid: (x1, y1, x2, y2), clipped sizes (w, h)
# and centres worked out by hand; the third reaches past the right and bottom borders (clipped
# to 19 and 15), the fourth has zero width, the fifth is padding.
TARGET_BOXES = [[4, 8, 36, 28], [40, 2, 58, 50], [50, 30, 100, 90], [10, 10, 10, 30], [0, 0, 0, 0]]
TARGET_LABELS = [1, 0, 1, 2, -1]
TARGET_SLOTS = [  # w, h, centre x, centre y
    (8.0, 5.0, 5.0, 4.5), (4.5, 12.0, 12.25, 6.5), (6.5, 7.5, 15.75, 11.25), None, None]


@check("centernet_targets", "slots and peaks by hand", OUTPUT_TOLERANCE, _boxes_dtype)
def _targets_by_hand(backend, dtype, quick):
    boxes = backend.to_device(np.array([TARGET_BOXES], dtype=np.float64), dtype)
    labels = backend.xp.asarray(np.array([TARGET_LABELS]))
    out = centernet_targets(boxes, labels, 3, (16, 20), max_objects=6, backend=backend.option)
    heatmap, wh, reg = (backend.to_host(a)[0] for a in out[:3])
    ind, reg_mask = (backend.to_host(a)[0] for a in out[3:])
    expected = np.zeros((6, 6))  # w, h, reg x, reg y, ind, mask
    peaks = []
    for m, slot in enumerate(TARGET_SLOTS):
        if slot is not None:
            w, h, cx, cy = slot
            expected[m] = (w, h, cx % 1, cy % 1, int(cy) * 20 + int(cx), 1)
            peaks.append(heatmap[TARGET_LABELS[m], int(cy), int(cx)])
    actual = np.column_stack([wh, reg, ind, reg_mask])
    errors = [relative_error(actual, expected), max(abs(p - 1.0) for p in peaks), max(0.0, heatmap.max() - 1.0)]
    # Nothing drawn for the empty box (class 2) and nothing outside [0, 1].
    errors.append(float(np.abs(heatmap[2]).max()) + max(0.0, -heatmap.min()))
    return max(errors)


@check("centernet_targets", "float32 vs float64", OUTPUT_TOLERANCE, lambda backend, dtype: dtype == "float32")
def _targets_float32(backend, dtype, quick):
    rng = np.random.default_rng(42)
    corners = np.round(rng.uniform(0, 60, (2, 8, 2)) * 4) / 4
    boxes = np.concatenate([corners, corners + np.round(rng.uniform(2, 40, (2, 8, 2)) * 4) / 4], axis=2)
    labels = backend.xp.asarray(rng.integers(-1, 4, (2, 8)))
    runs = [centernet_targets(backend.to_device(boxes, d), labels, 4, (16, 16), backend=backend.option)
            for d in (dtype, "float64")]
    return max(relative_error(backend.to_host(a), backend.to_host(b)) for a, b in zip(*runs))


def _focal_arrays(rng):
    """Predictions on a 1/64 grid inside the clamp bounds, targets with exact ones."""
    pred = rng.integers(1, HEAT_GRID, (2, 3, 8, 8)) / HEAT_GRID
    target = rng.integers(0, HEAT_GRID, pred.shape) / HEAT_GRID
    target.reshape(-1)[rng.permutation(target.size)[:5]] = 1.0
    return pred, target


def numpy_focal_loss(pred, target, alpha=2.0, beta=4.0) -> float:
    """The CenterNet focal loss in float64 NumPy (docs/centernet.md), predictions inside the clamp bounds."""
    positive = target == 1
    pos = np.where(positive, -np.log(pred) * (1 - pred) ** alpha, 0).sum()
    neg = np.where(positive, 0, -np.log(1 - pred) * pred ** alpha * (1 - target) ** beta).sum()
    return (pos + neg) / max(int(positive.sum()), 1)


@check("centernet_focal_loss", "loss = NumPy formula", OUTPUT_TOLERANCE)
def _focal_loss_formula(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(43))
    loss = centernet_focal_loss(backend.to_device(pred, dtype), backend.to_device(target, dtype),
                                backend=backend.option)
    return relative_error(backend.to_host(loss), np.asarray(numpy_focal_loss(pred, target)))


def _focal_grad(backend, dtype, pred, target, grad_output=1.5):
    grad = centernet_focal_loss_backward(backend.to_device(np.array(grad_output), dtype),
                                         backend.to_device(pred, dtype), backend.to_device(target, dtype),
                                         backend=backend.option)
    return backend.to_host(grad)


@check("centernet_focal_loss", "grad pred vs finite difference", FINITE_DIFFERENCE_TOLERANCE, float64_only)
def _focal_grad_finite_difference(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(44))
    direction = np.random.default_rng(45).standard_normal(pred.shape)
    h = FINITE_DIFFERENCE_STEP
    numeric = 1.5 * (numpy_focal_loss(pred + h * direction, target) - numpy_focal_loss(pred - h * direction, target))
    gradient = _focal_grad(backend, dtype, pred, target) * direction
    return abs(numeric / (2 * h) - gradient.sum()) / np.abs(gradient).sum()


@check("centernet_focal_loss", "grad vs float64", OUTPUT_TOLERANCE, below_float64)
def _focal_grad_float64(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(46))
    return relative_error(_focal_grad(backend, dtype, pred, target), _focal_grad(backend, "float64", pred, target))


# --- the runner ------------------------------------------------------------------------------


class Row(NamedTuple):
    op: str
    backend: str
    dtype: str
    check: str
    error: float
    tolerance: float
    seconds: float
    problem: Optional[str]  # the exception, when the check raised one

    @property
    def passed(self) -> bool:
        # A NaN error compares False, so it fails.
        return self.problem is None and self.error <= self.tolerance


def _run_one(entry: Check, backend: Backend, dtype: str, quick: bool) -> Row:
    start = time.perf_counter()
    problem = None
    try:
        error = float(entry.run(backend, dtype, quick))
    except Exception as exc:  # a crash is a failed check; the table goes on
        error = float("nan")
        problem = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    seconds = time.perf_counter() - start
    return Row(entry.op, backend.name, dtype, entry.name, error, entry.tolerance[dtype], seconds, problem)


COLUMNS = ("op", "backend", "dtype", "check", "max error", "tolerance", "time", "result")


def _cells(row: Row) -> tuple:
    return (
        row.op, row.backend, row.dtype, row.check, f"{row.error:.2e}", f"{row.tolerance:.0e}",
        f"{row.seconds * 1e3:.0f} ms", "PASS" if row.passed else "FAIL",
    )


def run_selftest(quick: bool = False, checks=None, backends=None, skipped=None, out=None) -> int:
    """Run ``checks`` (default: every registered check) on ``backends`` (default: all usable
    here), print the table to ``out`` and return the exit status: 1 if any check failed."""
    out = sys.stdout if out is None else out
    if backends is None:
        backends, skipped = discover_backends()
    skipped = skipped or {}
    checks = CHECKS if checks is None else checks
    ops = list(dict.fromkeys(entry.op for entry in checks))
    # Grouped by op, then backend, then dtype; checks in the order they were registered.
    runs = [
        (entry, backend, dtype)
        for op in ops
        for backend in backends
        for dtype in backend.dtypes
        for entry in checks
        if entry.op == op and entry.applies(backend, dtype)
    ]
    labels = [(entry.op, backend.name, dtype, entry.name) for entry, backend, dtype in runs]
    widths = [max([len(title)] + [len(label[i]) for label in labels]) for i, title in enumerate(COLUMNS[:4])]
    widths += [9, 9, 9, 6]

    def line(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out, flush=True)

    line(COLUMNS)
    rows = []
    for entry, backend, dtype in runs:
        rows.append(_run_one(entry, backend, dtype, quick))
        line(_cells(rows[-1]))
    failed = [row for row in rows if not row.passed]
    for row in failed:
        if row.problem:
            print(f"FAIL {row.op} / {row.backend} / {row.dtype} / {row.check}: {row.problem}", file=out)
    for name, reason in skipped.items():
        print(f"skipped backend {name}: {reason}", file=out)
    if not skipped:
        print("skipped backends: none", file=out)
    print(f"{len(rows) - len(failed)} checks passed, {len(failed)} failed", file=out)
    print("(times include JIT / NVRTC compilation on first use)", file=out)
    return 1 if failed else 0
