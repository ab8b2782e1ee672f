"""pytest plugin of the device check (tools/gpu_check.py), loaded with ``-p tools.gpu_check_plugin``.

- ``GPU_CHECK_EXAMPLES``: hypothesis examples per test (tests that set their own keep theirs),
  so the whole GPU suite fits the device's time.
- ``GPU_CHECK_NO_MEMORY_POOL=1``: CuPy allocates every array with its own cudaMalloc instead of
  carving it from a pooled block, so compute-sanitizer's memcheck sees each array's bounds (an
  access past the end of an array inside a pool block is otherwise not an error to it).
"""

import os


def pytest_configure(config):
    # Runs after tests/conftest.py has loaded its profile, so this one is the one in force.
    examples = os.environ.get("GPU_CHECK_EXAMPLES")
    if examples:
        from hypothesis import settings

        settings.register_profile("gpu-check", parent=settings.get_profile("ci"), deadline=None,
                                  derandomize=True, max_examples=int(examples))
        settings.load_profile("gpu-check")
    if os.environ.get("GPU_CHECK_NO_MEMORY_POOL") == "1":
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
