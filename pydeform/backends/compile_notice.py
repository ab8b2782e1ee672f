"""One line on stderr the first time a process really compiles kernels of an op family.

Compiling is one-time work that can take minutes on the CPU (Numba), and without a word a first
call looks like a hang. Each (backend, family) is announced at most once per process, and only
when kernels are compiled, never when they are loaded from a disk cache:

- **Numba CPU**: Numba's ``numba:compile`` event, which fires only after its disk cache missed,
  announces the compile before it starts.
- **Numba CUDA**: Numba's CUDA dispatcher fires no such event, so a launch is watched: if the
  kernel's cache-miss count grew, it was compiled, and the line follows that first compile.
- **CuPy**: CuPy writes a module into its kernel cache folder exactly when it has compiled it
  (loading from the cache writes nothing), so a module build that adds a file there, or any
  build with ``CUPY_CACHE_IN_MEMORY`` set, was a compile; the line follows it.

The line says where the compiled kernels are kept, and that ``python -m pydeform warmup``
compiles them ahead of time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from typing import Optional

from . import _FAMILIES

# kernel module name (numba_kernels/<name>.py, cupy_kernels/<name>.py and .cu) -> op family
FAMILY_OF_MODULE = {module: family for family, (module, _) in _FAMILIES.items()}

_announced: set = set()
_lock = threading.Lock()
_silenced = False  # set by `python -m pydeform warmup`, which reports compiles itself


def family_of(module_name: str) -> Optional[str]:
    """The op family whose kernels live in ``module_name`` (a dotted module name or a ``.cu``
    file name), or None for shared helpers."""
    stem = module_name.rsplit(".", 1)[-1] if not module_name.endswith(".cu") else module_name[:-3]
    return FAMILY_OF_MODULE.get(stem)


def numba_cache_folder() -> str:
    """Where Numba keeps pydeform's compiled kernels: ``NUMBA_CACHE_DIR`` if set, else
    ``__pycache__`` beside the kernel sources when writable, else a per-user folder (every
    kernel module sits beside bilinear.py, so one answer covers them all)."""
    from numba.core.caching import FunctionCache

    from .numba_kernels import bilinear

    return FunctionCache(bilinear.functions).cache_path


def cupy_cache_folder() -> Optional[str]:
    """CuPy's kernel cache folder, or None when ``CUPY_CACHE_IN_MEMORY`` keeps compiled kernels in memory only."""
    if os.environ.get("CUPY_CACHE_IN_MEMORY", "0") != "0":
        return None
    return os.path.expanduser(os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache"))


def announced(backend: str, family: str) -> bool:
    return (backend, family) in _announced


def announce(backend: str, family: str, what: str, cache_folder: Optional[str]) -> None:
    """Print ``what`` (a sentence about the compile) and where the kernels are cached, once per (backend, family)."""
    with _lock:
        if _silenced or (backend, family) in _announced:
            return
        _announced.add((backend, family))
    if cache_folder is None:
        kept = "CUPY_CACHE_IN_MEMORY is set: they are kept in memory only, so every process compiles them again"
    else:
        kept = f"This is one-time: compiled kernels are cached in {cache_folder}, where later processes load them"
    print(f"pydeform: {what}. {kept} (`python -m pydeform warmup` compiles ahead of time).",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def silenced():
    """No announcements inside (for a caller that reports compiles itself)."""
    global _silenced
    _silenced = True
    try:
        yield
    finally:
        _silenced = False


def _announce_numba_cpu_compile(dispatcher) -> None:
    from numba.core.registry import CPUDispatcher

    family = family_of(dispatcher.py_func.__module__)
    if isinstance(dispatcher, CPUDispatcher) and family is not None and not announced("Numba CPU", family):
        announce("Numba CPU", family,
                 f"compiling the Numba CPU kernels of the {family} ops on first use (this can take minutes)",
                 numba_cache_folder())


@functools.lru_cache(maxsize=None)
def watch_numba_cpu_compiles() -> None:
    """Register, once per process, a ``numba:compile`` listener announcing the first CPU compile of each family."""
    from numba.core import event

    class FirstCompiles(event.Listener):
        def on_start(self, ev):
            _announce_numba_cpu_compile(ev.data["dispatcher"])

        def on_end(self, ev):
            pass

    event.register("numba:compile", FirstCompiles())


@contextlib.contextmanager
def watching_numba_cuda_launch(kernel):
    """Around a launch of the Numba CUDA ``kernel``: announce its family if the launch compiled it."""
    family = family_of(kernel.py_func.__module__)
    if family is None or announced("Numba CUDA", family):
        yield
        return
    misses = sum(kernel.stats.cache_misses.values())
    start = time.perf_counter()
    yield
    if sum(kernel.stats.cache_misses.values()) > misses:
        announce("Numba CUDA", family,
                 f"compiled a Numba CUDA kernel of the {family} ops in {time.perf_counter() - start:.1f} s; "
                 "its other kernels and dtypes compile on their first use",
                 numba_cache_folder())


def _cache_entries(folder: Optional[str]) -> set:
    try:
        return set(os.listdir(folder)) if folder is not None else set()
    except FileNotFoundError:
        return set()


@contextlib.contextmanager
def watching_cupy_build(source: str, type_name: str):
    """Around the build of the CuPy module of ``source`` (a ``.cu`` file) for ``type_name``:
    announce its family if the build compiled it (see the module docstring)."""
    family = family_of(source)
    if family is None or announced("CuPy", family):
        yield
        return
    folder = cupy_cache_folder()
    before = _cache_entries(folder)
    start = time.perf_counter()
    yield
    if folder is None or _cache_entries(folder) - before:
        announce("CuPy", family,
                 f"compiled the CUDA C kernels of the {family} ops for {type_name} with NVRTC in "
                 f"{time.perf_counter() - start:.1f} s; other storage types compile on their first use",
                 folder)
