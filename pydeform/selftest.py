"""``python -m pydeform selftest``: check every op on every backend this machine can run.

The checks need nothing but pydeform and NumPy (the test suite's float64 reference is not
installed): agreement with a float64 run of the same backend, agreement of the GPU backends with
the Numba CPU backend in float64, finite-difference gradients, and special cases whose answer
NumPy computes directly (zero offsets and a unit mask give an ordinary convolution).

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

__all__ = [
    "CHECKS",
    "Backend",
    "Check",
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
        return 'CuPy not installed (pip install "pydeform[cuda12]" or "pydeform[cuda13]")'
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


def _deform_conv_cases(quick: bool):
    """(case, float64 arguments, float64 output gradient) for each case run."""
    for index, case in enumerate(DEFORM_CONV_CASES[:1] if quick else DEFORM_CONV_CASES):
        rng = np.random.default_rng(index)
        arrays = case.arrays(rng)
        grad_output = rng.standard_normal((case.n, case.out_channels, *case.out_size()))
        yield case, arrays, grad_output


def _rounded(arrays: dict, dtype: str) -> dict:
    """The arguments rounded to ``dtype`` and held in float64, so runs in different dtypes see
    the same numbers."""
    return {k: v.astype(dtype_of(dtype)).astype(np.float64) for k, v in arrays.items()}


def _deform_conv_forward(backend, dtype, case, arrays) -> np.ndarray:
    from .deform_conv import deform_conv2d

    device = {k: backend.to_device(v, dtype) for k, v in arrays.items()}
    return backend.to_host(deform_conv2d(**device, **case.options(), backend=backend.option))


def _deform_conv_backward(backend, dtype, case, arrays, grad_output) -> dict:
    from .deform_conv import deform_conv2d_backward

    device = {k: backend.to_device(v, dtype) for k, v in arrays.items()}
    grads = deform_conv2d_backward(
        backend.to_device(grad_output, dtype), **device, **case.options(), backend=backend.option
    )
    return {name: backend.to_host(g) for name, g in grads._asdict().items() if g is not None}


def _largest_gradient_error(actual: dict, expected: dict) -> float:
    return max(relative_error(actual[name], expected[name]) for name in expected)


def _forward_check(expected, prepare=None):
    """A check of the forward on the arguments rounded to the dtype (then changed by
    ``prepare(arrays)``) against ``expected(backend, case, arrays)``, a float64 result."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, _ in _deform_conv_cases(quick):
            arrays = _rounded(arrays, dtype)
            if prepare is not None:
                prepare(arrays)
            actual = _deform_conv_forward(backend, dtype, case, arrays)
            errors.append(relative_error(actual, expected(backend, case, arrays)))
        return max(errors)

    return run


def _backward_check(reference):
    """A check of every gradient against ``reference(backend)`` run in float64."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, grad_output in _deform_conv_cases(quick):
            arrays = _rounded(dict(arrays, grad_output=grad_output), dtype)
            grad_output = arrays.pop("grad_output")
            actual = _deform_conv_backward(backend, dtype, case, arrays, grad_output)
            expected = _deform_conv_backward(reference(backend), "float64", case, arrays, grad_output)
            errors.append(_largest_gradient_error(actual, expected))
        return max(errors)

    return run


def _same_backend(backend):
    return backend


def _numba_cpu(backend):
    return NUMBA_CPU


def _float64_forward_of(reference):
    return lambda backend, case, arrays: _deform_conv_forward(reference(backend), "float64", case, arrays)


check("deform_conv2d", "forward vs float64", OUTPUT_TOLERANCE, below_float64)(
    _forward_check(_float64_forward_of(_same_backend)))
check("deform_conv2d", "backward vs float64", OUTPUT_TOLERANCE, below_float64)(_backward_check(_same_backend))
check("deform_conv2d", "forward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(
    _forward_check(_float64_forward_of(_numba_cpu)))
check("deform_conv2d", "backward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(_backward_check(_numba_cpu))


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


def _zero_offsets_unit_mask(arrays):
    arrays["offset"] = np.zeros_like(arrays["offset"])
    arrays["mask"] = np.ones_like(arrays["mask"])


def _whole_pixel_offsets(arrays):
    arrays["offset"] = np.floor(arrays["offset"])


check("deform_conv2d", "zero offsets = convolution", OUTPUT_TOLERANCE)(_forward_check(
    lambda backend, case, a: ordinary_conv2d(a["input"], a["weight"], a["bias"], **case.options()),
    prepare=_zero_offsets_unit_mask,
))
check("deform_conv2d", "whole-pixel offsets = gather", OUTPUT_TOLERANCE)(_forward_check(
    lambda backend, case, arrays: whole_pixel_deform_conv2d(**arrays, **case.options()),
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
                _deform_conv_forward(backend, dtype, case, absent),
                _deform_conv_forward(backend, dtype, case, unit),
            )
        )
        unit_grads = _deform_conv_backward(backend, dtype, case, unit, grad_output)
        del unit_grads["mask"]
        errors.append(
            _largest_gradient_error(_deform_conv_backward(backend, dtype, case, absent, grad_output), unit_grads)
        )
    return max(errors)


# Small enough to stay inside one bilinear cell (fractions are >= 0.05 from an edge); the forward
# is at most quadratic along any direction there, so the central difference has rounding error only.
FINITE_DIFFERENCE_STEP = 1e-5


def _finite_difference_check(argument):
    """d loss / d argument along a random direction, loss = sum(grad_output * out)."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, grad_output in _deform_conv_cases(quick):
            rng = np.random.default_rng(len(argument))
            direction = rng.standard_normal(arrays[argument].shape)

            def loss(step):
                moved = dict(arrays, **{argument: arrays[argument] + step * direction})
                return float(np.sum(grad_output * _deform_conv_forward(backend, dtype, case, moved)))

            h = FINITE_DIFFERENCE_STEP
            numeric = (loss(h) - loss(-h)) / (2 * h)
            gradient = _deform_conv_backward(backend, dtype, case, arrays, grad_output)[argument]
            analytic = float(np.sum(gradient * direction))
            # Relative to the sum of the magnitudes of its terms, which cancellation cannot shrink.
            scale = float(np.sum(np.abs(gradient * direction)))
            errors.append(abs(numeric - analytic) / scale)
        return max(errors)

    return run


for _argument in DEFORM_CONV_GRADIENTS:
    check(
        "deform_conv2d", f"grad {_argument} vs finite difference", FINITE_DIFFERENCE_TOLERANCE, float64_only
    )(_finite_difference_check(_argument))


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
