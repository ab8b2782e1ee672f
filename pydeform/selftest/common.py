"""What every selftest family builds on: the backends, the check registry, the generic checks
(against float64 runs, the Numba CPU backend and finite differences) and the runner that prints
the table. A family module (deform_conv.py, roi.py, ...) registers its op's checks with
:func:`check` and :func:`register_common_checks` when it is imported.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np

from .._arrays import _CPU_DTYPES, _GPU_DTYPES


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
    from ..backends.numba_cuda import cuda

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
    gradients, None for an absent argument; ``backward`` is None for an op without one); ``cases(quick)`` yields ``(case, arguments,
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


def rounded(arrays: dict, dtype: str) -> dict:
    """The float arguments rounded to their storage type for ``dtype`` and held in float64, so
    runs in different dtypes see the same numbers; integer and bool ones (labels, masks) as they are."""
    return {k: v.astype(dtype_of(storage_dtype(k, dtype))).astype(np.float64) if v.dtype.kind == "f" else v
            for k, v in arrays.items()}


def on_device(backend, dtype, arrays: dict) -> dict:
    return {k: backend.to_device(v, storage_dtype(k, dtype)) if v.dtype.kind == "f" else backend.xp.asarray(v)
            for k, v in arrays.items()}


def run_forward(calls: OpCalls, backend, dtype, case, arrays) -> np.ndarray:
    output = calls.forward(**on_device(backend, dtype, arrays), **case.options(), backend=backend.option)
    return backend.to_host(output)


def run_backward(calls: OpCalls, backend, dtype, case, arrays, grad_output) -> dict:
    grads = calls.backward(backend.to_device(grad_output, dtype), **on_device(backend, dtype, arrays),
                           **case.options(), backend=backend.option)
    return {name: backend.to_host(g) for name, g in grads._asdict().items() if g is not None}


def largest_gradient_error(actual: dict, expected: dict) -> float:
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
            arrays = rounded(arrays, dtype)
            actual = run_forward(calls, backend, dtype, case, arrays)
            errors.append(relative_error(actual, expected(backend, dtype, case, arrays)))
        return max(errors)

    return run


def backward_check(calls: OpCalls, reference):
    """A check of every gradient against ``reference(backend)`` run in float64."""

    def run(backend, dtype, quick):
        errors = []
        for case, arrays, grad_output in calls.cases(quick):
            arrays = rounded(dict(arrays, grad_output=grad_output), dtype)
            grad_output = arrays.pop("grad_output")
            actual = run_backward(calls, backend, dtype, case, arrays, grad_output)
            expected = run_backward(calls, reference(backend), "float64", case, arrays, grad_output)
            errors.append(largest_gradient_error(actual, expected))
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


def same_backend(backend):
    return backend


def numba_cpu(backend):
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
    """Forward and backward (if the op has one) against a float64 run of the same backend and, on
    a GPU, of the Numba CPU backend; each gradient named in ``gradients`` against finite
    differences in float64."""
    op = calls.op
    check(op, "forward vs float64", OUTPUT_TOLERANCE, below_float64)(
        forward_check(calls, _float64_forward_of(calls, same_backend)))
    if calls.backward is not None:
        check(op, "backward vs float64", OUTPUT_TOLERANCE, below_float64)(backward_check(calls, same_backend))
    check(op, "forward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(
        forward_check(calls, _float64_forward_of(calls, numba_cpu)))
    if calls.backward is not None:
        check(op, "backward vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(backward_check(calls, numba_cpu))
    for argument in gradients:
        check(op, f"grad {argument} vs finite difference", FINITE_DIFFERENCE_TOLERANCE, float64_only)(
            finite_difference_check(calls, argument))


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
