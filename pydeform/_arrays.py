"""Array rules shared by every op: which library an array belongs to, dtypes, devices.

Every public op calls these checks before any backend sees an array, so each rule is written
once and every error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading

import numpy as np

__all__ = [
    "accumulation_dtype",
    "array_library",
    "check_arrays",
    "check_backend",
    "check_finite_float",
    "check_int",
    "dtype_mismatch",
    "int_pair",
    "shape_of",
    "thread_setting",
    "unchecked_values",
    "values_checked",
]

BACKENDS = ("cupy", "numba")

_CPU_DTYPES = ("float32", "float64")
_GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def array_library(name: str, value) -> str:
    """Return ``"numpy"`` or ``"cupy"`` for a supported array, else raise ``TypeError``."""
    if isinstance(value, np.ndarray):
        return "numpy"
    if type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "__cuda_array_interface__"):
        return "cupy"
    raise TypeError(
        f"{name}: expected a NumPy or CuPy array, got {type(value).__module__}.{type(value).__qualname__}"
    )


def _device_id(value) -> int:
    return value.device.id


def check_backend(backend, library: str) -> str:
    """Resolve ``backend=`` for arrays of ``library``; return ``"cupy"``, ``"numba"``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None, 'cupy' or 'numba', got {backend!r}")
    if library == "numpy":
        if backend == "cupy":
            raise ValueError(
                "backend: 'cupy' runs on CuPy arrays only, got NumPy arrays "
                "(use backend=None or 'numba' for the CPU)"
            )
        return "numba"
    return backend or "cupy"


def check_arrays(arrays: dict, *, ranks: dict) -> tuple[str, np.dtype]:
    """Check that the named arrays share one library, device and floating dtype.

    ``arrays`` maps argument names to arrays (or None for an absent optional argument, which is
    skipped); ``ranks`` maps the same names to the expected number of dimensions. The first
    array fixes the library, device and dtype the others must match. Returns
    ``(library, dtype)``.
    """
    present = {k: v for k, v in arrays.items() if v is not None}
    first_name, first = next(iter(present.items()))
    library = array_library(first_name, first)
    dtype = np.dtype(first.dtype)
    allowed = _CPU_DTYPES if library == "numpy" else _GPU_DTYPES
    for name, value in present.items():
        lib = array_library(name, value)
        if lib != library:
            raise TypeError(f"{name}: expected a {library} array like {first_name}, got a {lib} array")
        if library == "cupy" and _device_id(value) != _device_id(first):
            raise ValueError(
                f"{name}: expected an array on GPU {_device_id(first)} like {first_name}, "
                f"got one on GPU {_device_id(value)}"
            )
        if _dtype_name(value.dtype) not in allowed:
            where = "on the CPU (NumPy arrays)" if library == "numpy" else "on the GPU"
            raise TypeError(
                f"{name}: expected a floating dtype among {', '.join(allowed)} {where}, "
                f"got {_dtype_name(value.dtype)}"
            )
        if np.dtype(value.dtype) != dtype:
            raise dtype_mismatch(name, first_name, present)
        if value.ndim != ranks[name]:
            raise ValueError(
                f"{name}: expected a {ranks[name]}-d array, got {value.ndim}-d with shape {tuple(value.shape)}"
            )
    return library, dtype


def dtype_mismatch(name: str, first_name: str, arrays: dict) -> TypeError:
    """The error for array ``name`` whose dtype differs from ``first_name``'s, naming the dtype
    of every array in ``arrays`` (the first one may be the odd one out)."""
    dtypes = ", ".join(f"{key} {_dtype_name(value.dtype)}" for key, value in arrays.items() if hasattr(value, "dtype"))
    return TypeError(
        f"{name}: expected dtype {_dtype_name(arrays[first_name].dtype)} like {first_name}, got "
        f"{_dtype_name(arrays[name].dtype)}; all arrays of a call share one dtype (got {dtypes})"
    )


def shape_of(array) -> tuple:
    """An array's shape as a tuple of Python ints (CuPy and NumPy alike)."""
    return tuple(int(s) for s in array.shape)


def accumulation_dtype(dtype) -> np.dtype:
    """float64 accumulates in float64; float32, float16 and bfloat16 in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_int(name: str, value, minimum=None) -> int:
    """An int argument (not a bool), >= ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """A bool argument (a flag such as ``deterministic``), exactly True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_finite_float(name: str, value) -> float:
    """A finite real argument (not a bool) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def int_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints (per-axis h, w) and check each is >= ``minimum``."""
    items = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items
    ):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        bound = f"positive values (>= {minimum})" if minimum == 1 else f"values >= {minimum}"
        raise ValueError(f"{name}: expected {bound}, got {value!r}")
    return int(items[0]), int(items[1])


_local = threading.local()


@contextlib.contextmanager
def thread_setting(local: threading.local, name: str, value):
    """Set attribute ``name`` of the thread-local ``local`` to ``value`` within the block; the
    previous value (None when unset) comes back after it, so blocks nest."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


def unchecked_values():
    """A block (on this thread) in which the *values* of RoI boxes, CenterNet labels / boxes and
    focal-loss targets are not checked on the host; shapes, dtypes and devices still are.

    On a GPU that check reads a flag back to the host, a synchronisation that
    :mod:`pydeform.torch` and :mod:`pydeform.jax` must not make on CUDA arrays (it would stall
    the stream and breaks graph capture), so they run GPU calls in this block. The kernels need
    no host check to stay in bounds: a roi whose batch index is not an integer in ``[0, N)`` or
    that has a non-finite coordinate gives 0 outputs and no gradient, an object whose label
    is outside ``[0, num_classes)`` or whose box is not finite is not drawn, and a focal-loss
    target outside ``[0, 1]`` (or NaN) makes the loss and that pixel's gradient NaN.
    """
    return thread_setting(_local, "unchecked", True)


def values_checked() -> bool:
    """False inside an :func:`unchecked_values` block on this thread."""
    return not getattr(_local, "unchecked", None)
