"""The array-level entry for every framework: any array with ``__dlpack__`` in, the caller's
array type out.

Every public op of pydeform is wrapped by :func:`dlpack_entry`. NumPy and CuPy arrays pass
straight through (one type lookup per argument). Arrays of other frameworks (PyTorch, JAX, ...)
are exchanged through DLPack without a copy: CPU arrays become NumPy arrays, CUDA arrays CuPy
arrays on the same device; torch tensors that require grad are detached for the exchange (the
array-level functions do not record autograd history; :mod:`pydeform.torch` does). The results
(arrays, NamedTuples of arrays, None) come back through the caller's framework's
``from_dlpack``, on the caller's device.

CuPy allocates and launches on its *current* device, whatever device the arrays are on, so the
entry makes the device of the first CUDA array argument CuPy's current device for the call (the
Numba CUDA launches follow it, see ``launch_cuda``); the op runs on CuPy's current stream of that
device.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys

import numpy as np

__all__ = ["dlpack_entry", "from_native", "to_native"]

# DLPack device types (dlpack.h, DLDeviceType).
_DLPACK_CPU = 1
_DLPACK_CUDA = 2

# What a value of each type is to the entry (cached per type, so the fast path is one dict
# lookup per argument): pass it through, exchange it, look inside (a list of rois), or run on
# its GPU (a CuPy array).
_PLAIN, _FOREIGN, _SEQUENCE, _CUPY = 0, 1, 2, 3
_kinds: dict[type, int] = {np.ndarray: _PLAIN, type(None): _PLAIN, int: _PLAIN, float: _PLAIN, bool: _PLAIN,
                           str: _PLAIN, list: _SEQUENCE, tuple: _SEQUENCE}


def _framework(value) -> str:
    """The top-level package of a value's type (``"torch"``, ``"jax"``, ``"jaxlib"``, ...)."""
    return type(value).__module__.split(".")[0]


def _kind(cls: type) -> int:
    kind = _kinds.get(cls)
    if kind is None:
        package = cls.__module__.split(".")[0]
        if package == "cupy" and hasattr(cls, "__cuda_array_interface__"):
            kind = _CUPY
        elif package != "numpy" and hasattr(cls, "__dlpack__"):
            kind = _FOREIGN
        else:
            kind = _PLAIN
        _kinds[cls] = kind
    return kind


def _scan(values):
    """``(foreign, gpu_array)``: whether ``values`` (or the items of list / tuple ones) hold an
    array to exchange, and the first CuPy array among them (None if none)."""
    gpu_array = None
    for value in values:
        kind = _kinds.get(type(value))
        if kind is None:
            kind = _kind(type(value))
        if kind == _SEQUENCE:
            for item in value:
                item_kind = _kind(type(item))
                if item_kind == _FOREIGN:
                    return True, None
                if item_kind == _CUPY and gpu_array is None:
                    gpu_array = item
        elif kind == _FOREIGN:
            return True, None
        elif kind == _CUPY and gpu_array is None:
            gpu_array = value
    return False, gpu_array


def _on_gpu(device_id: int, func, args, kwargs):
    """``func(*args, **kwargs)`` with CUDA device ``device_id`` as CuPy's current device."""
    import cupy

    with cupy.cuda.Device(device_id):
        return func(*args, **kwargs)


def _describe(value) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _dlpack_device(name: str, value) -> tuple[int, int]:
    try:
        device_type, device_id = value.__dlpack_device__()
    except Exception as error:  # e.g. torch's meta tensors: "Unknown device type meta for Dlpack"
        # JAX tracers (under jit / grad / vmap) hold no memory to exchange.
        hint = "; under jax.jit, jax.grad or jax.vmap use pydeform.jax" if _framework(value) == "jax" else ""
        raise ValueError(
            f"{name}: expected an array on the CPU or a CUDA GPU, got a {_describe(value)} whose device "
            f"DLPack cannot describe ({error}){hint}"
        ) from None
    device_type, device_id = int(device_type), int(device_id)
    if device_type not in (_DLPACK_CPU, _DLPACK_CUDA):
        raise ValueError(
            f"{name}: expected an array on the CPU or a CUDA GPU, got a {_describe(value)} on DLPack "
            f"device type {device_type} (device {device_id})"
        )
    return device_type, device_id


def _device_words(device: tuple[int, int]) -> str:
    return "the CPU" if device[0] == _DLPACK_CPU else f"CUDA GPU {device[1]}"


def to_native(name: str, value, device: tuple[int, int] | None = None):
    """``value`` (any array with ``__dlpack__``) as a NumPy array (CPU) or CuPy array (CUDA),
    sharing its memory.

    ``device``, a DLPack ``(device_type, device_id)``, is the device the array must be on.
    Raises ``ValueError`` for other devices and ``TypeError`` for a dtype the target library
    cannot hold.
    """
    actual = _dlpack_device(name, value)
    if device is not None and actual != device:
        raise ValueError(f"{name}: expected an array on {_device_words(device)}, got one on {_device_words(actual)}")
    if _framework(value) == "torch" and value.requires_grad:
        # torch refuses to export a tensor that is part of an autograd graph.
        value = value.detach()
    try:
        if actual[0] == _DLPACK_CPU:
            return np.from_dlpack(value)
        import cupy

        return cupy.from_dlpack(value)
    except (BufferError, RuntimeError, TypeError, ValueError) as error:
        library = "NumPy" if actual[0] == _DLPACK_CPU else "CuPy"
        raise TypeError(
            f"{name}: a {_describe(value)} of dtype {getattr(value, 'dtype', '?')} on {_device_words(actual)} "
            f"cannot be exchanged with {library} through DLPack ({error})"
        ) from None


def _from_dlpack_of(like):
    """The ``from_dlpack`` of ``like``'s framework (``torch.from_dlpack``, ``jax.numpy.from_dlpack``, ...)."""
    if _framework(like) == "torch":
        return sys.modules["torch"].from_dlpack
    if hasattr(like, "__array_namespace__"):
        return like.__array_namespace__().from_dlpack
    package = sys.modules.get(_framework(like))
    convert = getattr(package, "from_dlpack", None)
    if convert is None:
        raise TypeError(
            f"cannot return results as {_describe(like)}: neither its type's __array_namespace__ nor "
            f"its package {_framework(like)!r} has a from_dlpack"
        )
    return convert


def from_native(result, like):
    """``result`` (a NumPy / CuPy array, None, or a tuple or NamedTuple of those) converted to
    ``like``'s framework, sharing memory where that framework's ``from_dlpack`` does."""
    return _returner(like)(result)


def _returner(like):
    convert = _from_dlpack_of(like)

    def back(result):
        if result is None:
            return None
        if isinstance(result, tuple):
            values = [back(item) for item in result]
            return type(result)._make(values) if hasattr(type(result), "_make") else tuple(values)
        # NumPy reductions of 0-d arrays give scalars, which have no __dlpack__.
        return convert(np.asarray(result) if isinstance(result, np.generic) else result)

    return back


def _is_array(value) -> bool:
    return _kind(type(value)) == _FOREIGN or isinstance(value, np.ndarray) or _framework(value) == "cupy"


def _arrays_in(arguments: dict):
    """(label, array) for every array among the arguments and the items of list / tuple ones."""
    for name, value in arguments.items():
        if isinstance(value, (list, tuple)):
            yield from ((f"{name}[{i}]", item) for i, item in enumerate(value) if _is_array(item))
        elif _is_array(value):
            yield name, value


def dlpack_entry(func):
    """Let ``func`` (a public op taking NumPy / CuPy arrays) take any array with ``__dlpack__``.

    Array arguments (and the items of list / tuple arguments, such as per-image rois) of a
    framework other than NumPy / CuPy are exchanged through :func:`to_native`; they must all
    belong to one framework and one device, that of the first one. The results come back
    through that framework's ``from_dlpack``.
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def entry(*args, **kwargs):
        foreign, gpu_array = _scan(itertools.chain(args, kwargs.values()))
        if not foreign:
            if gpu_array is None:
                return func(*args, **kwargs)
            return _on_gpu(gpu_array.device.id, func, args, kwargs)
        bound = signature.bind(*args, **kwargs)
        arrays = list(_arrays_in(bound.arguments))
        first_label, first = next((label, v) for label, v in arrays if _kind(type(v)) == _FOREIGN)
        for label, value in arrays:
            if _framework(value) != _framework(first):
                raise TypeError(f"{label}: expected a {_describe(first)} like {first_label}, got {_describe(value)}")
        device = _dlpack_device(first_label, first)
        for name, value in bound.arguments.items():
            if isinstance(value, (list, tuple)):
                bound.arguments[name] = type(value)(
                    to_native(f"{name}[{i}]", item, device) if _kind(type(item)) == _FOREIGN else item
                    for i, item in enumerate(value)
                )
            elif _kind(type(value)) == _FOREIGN:
                bound.arguments[name] = to_native(name, value, device)
        back = _returner(first)
        if device[0] == _DLPACK_CUDA:
            return back(_on_gpu(device[1], func, bound.args, bound.kwargs))
        return back(func(*bound.args, **bound.kwargs))

    return entry
