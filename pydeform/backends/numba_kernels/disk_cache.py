"""Numba's on-disk cache for kernels built by factories (closures over compiled helpers).

Numba keys a cached function by its bytecode and, for a closure, by a pickle of its cells. Our
kernels close over compiled helpers (a :class:`~.targets.Target`'s functions, the per-sample
functions of an op), and a pickled dispatcher carries a random uuid made fresh in every
process, so with plain ``cache=True`` the key never matches in a later process: the cache is
written and never read. :func:`cache_on_disk` keys a kernel instead by a fingerprint that is the
same in every process and changes whenever anything the kernel is compiled from changes: the
code, constants and referenced globals of the kernel and of every function it reaches through
its closure and globals, the options of the kernel and of each helper, and the size and
modification time of each of their source files (Numba itself only checks the kernel's own
file, and leaves the kernel's options out of its key).

Where the files go is Numba's choice: ``NUMBA_CACHE_DIR`` if set, else ``__pycache__`` beside
the source when writable, else a per-user cache folder.
"""

from __future__ import annotations

import hashlib
import os
import types

import numpy as np


def cache_on_disk(dispatcher):
    """Key ``dispatcher``'s disk cache (enabled with ``cache=True``) by :func:`fingerprint`.

    Numba's index key reads only ``__code__`` and ``__closure__`` of the cache's ``_py_func``;
    it is given the kernel's code and a single cell holding the fingerprint. Under
    ``NUMBA_DISABLE_JIT=1`` the decorators return the plain function: nothing to cache.
    """
    if not hasattr(dispatcher, "_cache"):
        return dispatcher
    dispatcher._cache._py_func = types.SimpleNamespace(
        __code__=dispatcher.py_func.__code__, __closure__=(types.CellType(fingerprint(dispatcher)),)
    )
    return dispatcher


def fingerprint(function) -> str:
    """A hex digest of everything ``function`` (a plain function or a Numba dispatcher, whose
    options count too) is compiled from (see the module docstring)."""
    digest = hashlib.sha256()
    _describe(function, digest, set())
    return digest.hexdigest()


def _update(digest, *parts) -> None:
    digest.update(repr(parts).encode())


def _source_stamp(filename: str):
    try:
        stat = os.stat(filename)
    except OSError:  # code compiled from a string: its text is in the bytecode description
        return None
    return stat.st_mtime_ns, stat.st_size


def _describe_code(code: types.CodeType, digest, names: set) -> None:
    _update(digest, code.co_code, code.co_names, code.co_varnames, code.co_freevars)
    names.update(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _describe_code(constant, digest, names)
        else:
            _update(digest, type(constant).__name__, constant)


def _describe(value, digest, seen: set) -> None:
    py_func = getattr(value, "py_func", None)
    if isinstance(py_func, types.FunctionType):  # a Numba dispatcher, CPU or CUDA
        _update(digest, "dispatcher", type(value).__name__, sorted(value.targetoptions.items(), key=repr))
        value = py_func
    if isinstance(value, types.FunctionType):
        if id(value) in seen:  # recursion, or a helper reached twice: described once
            _update(digest, "seen", value.__qualname__)
            return
        seen.add(id(value))
        code = value.__code__
        _update(digest, "function", value.__module__, value.__qualname__, _source_stamp(code.co_filename))
        names: set = set()
        _describe_code(code, digest, names)
        for name in sorted(names & value.__globals__.keys()):
            _update(digest, "global", name)
            _describe(value.__globals__[name], digest, seen)
        for cell in value.__closure__ or ():
            _describe(cell.cell_contents, digest, seen)
        _describe(value.__defaults__, digest, seen)
    elif isinstance(value, types.ModuleType):
        _update(digest, "module", value.__name__)
    elif isinstance(value, np.ndarray):  # Numba freezes global arrays into the code
        _update(digest, "array", value.dtype.str, value.shape)
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        _update(digest, type(value).__name__, len(value))
        for item in value:
            _describe(item, digest, seen)
    else:
        # Numbers, strings, None, classes, builtins: their repr is their value. An object whose
        # repr holds its address changes the key in every process (a cache miss, never a wrong hit).
        _update(digest, type(value).__module__, type(value).__qualname__, repr(value))
