"""Test-suite wide settings: hypothesis profiles and the skipping of ``gpu``-marked tests.

The markers themselves (``gpu``, ``slow``) are declared in pyproject.toml.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import settings

# No deadline anywhere: the first example of a test may include a JIT compile.
settings.register_profile("dev", max_examples=25, deadline=None)
# hypothesis' built-in "ci" profile (derandomized, no database), kept a little smaller.
settings.register_profile(
    "ci", parent=settings.get_profile("ci"), deadline=None, derandomize=True, max_examples=30
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@functools.lru_cache(maxsize=None)
def gpu_skip_reason() -> str | None:
    """None when CuPy sees at least one CUDA device, else why GPU tests cannot run.

    Numba's ``cuda.is_available()`` is not asked: under the CUDA simulator it is True without
    a GPU.
    """
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # ImportError, no driver, driver too old, ...
        return f"no usable CUDA GPU: CuPy failed to count devices ({type(error).__name__}: {error})"
    if count <= 0:
        return "no usable CUDA GPU: CuPy sees 0 devices"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and gpu_skip_reason() is not None:
        skip = pytest.mark.skip(reason=gpu_skip_reason())
        for item in gpu_items:
            item.add_marker(skip)
