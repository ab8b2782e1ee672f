"""The one place pydeform imports Numba's CUDA target from.

Numba's CUDA support lives in the ``numba-cuda`` package; keeping the import here makes a
move to its successor a one-line change.
"""

from numba import cuda

__all__ = ["cuda", "libdevice", "simulator_enabled"]


def simulator_enabled() -> bool:
    """True under ``NUMBA_ENABLE_CUDASIM=1``, where ``cuda.is_available()`` is True without a GPU."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def libdevice():
    """Numba's bindings of libdevice, CUDA's device math library (stubs returning None under the
    simulator)."""
    from numba.cuda import libdevice as module

    return module
