"""Numba's on-disk kernel cache: a second process loads every kernel it runs and compiles none.

The kernels are closures over compiled helpers; Numba's own cache key for a closure changes in
every process (see pydeform/backends/numba_kernels/disk_cache.py), so these tests check hits
across processes, and that kernels with the same code but different helpers never share an
entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
from numba.core import event

from pydeform.backends.numba_kernels.disk_cache import cache_on_disk, fingerprint
from pydeform.backends.numba_kernels.targets import cpu_kernel

REPO = Path(__file__).resolve().parents[1]

# Runs deform_conv2d and roi_align forward on the Numba CPU backend (a few kernels: a cold
# compile of all of them takes minutes on two cores) and prints, as JSON, how many functions
# Numba compiled, the first and second call times of deform_conv2d (after Numba's one-time
# set-up, which every Numba program pays) and a digest of the results.
CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, time
    import numpy as np
    from numba.core import event
    from numba.core.registry import cpu_target
    import pydeform

    cpu_target.target_context.refresh()  # Numba's one-time set-up, not compilation
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6), dtype=np.float32)
    offset = rng.standard_normal((1, 18, 6, 6), dtype=np.float32)
    mask = rng.random((1, 9, 6, 6), dtype=np.float32)
    weight = rng.standard_normal((4, 4, 3, 3), dtype=np.float32)
    rois = np.array([[0, 0.5, 1.0, 4.5, 5.0]], np.float32)
    digest = hashlib.sha256()
    with event.install_recorder("numba:compile") as compiles:
        start = time.perf_counter()
        y = pydeform.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        first = time.perf_counter() - start
        start = time.perf_counter()
        pydeform.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        second = time.perf_counter() - start
        pooled = pydeform.roi_align(x, rois, 2, sampling_ratio=2, aligned=True)
    for array in (y, pooled):
        digest.update(array.tobytes())
    print(json.dumps({"compiles": len(compiles.buffer), "first": first, "second": second,
                      "digest": digest.hexdigest()}))
    """
)


def _run_child(cache_dir: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    cold = _run_child(tmp_path)
    assert cold["compiles"] > 0
    assert list(tmp_path.rglob("*.nbi")) and list(tmp_path.rglob("*.nbc"))
    warm = _run_child(tmp_path)
    assert warm["compiles"] == 0, "a kernel was compiled although the disk cache held it"
    assert warm["digest"] == cold["digest"]
    # PERF.md: first call <= 0.5 s over a warm call once the cache is warm (printed with -s).
    print(f"\nfirst call, cold cache {cold['first']:.3f} s; warm cache {warm['first']:.3f} s; "
          f"warm call {warm['second']:.4f} s")
    assert warm["first"] < cold["first"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh Numba cache folder for kernels built in this process (read when a cache is made)."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    return tmp_path


def _scaled_kernel_factory(helper):
    """Kernels with one code and a helper from their closure, as the op modules build them."""

    def apply(values, out):
        for i in range(values.size):
            out[i] = helper(values[i])

    return apply


def _helpers():
    """Two compiled helpers; made anew on each call, as in a new process."""
    return numba.njit(lambda v: 2.0 * v), numba.njit(lambda v: 3.0 * v)


def _cached(fn):
    return cache_on_disk(numba.njit(cache=True)(fn))


def _compile_count(kernel, *args) -> int:
    with event.install_recorder("numba:compile") as compiles:
        kernel(*args)
    return len(compiles.buffer)


def test_same_code_with_other_helpers_is_another_cache_entry(cache_dir):
    values = np.arange(4.0)
    double, triple = _helpers()
    doubled, tripled = np.empty(4), np.empty(4)
    assert _compile_count(_cached(_scaled_kernel_factory(double)), values, doubled) > 0
    assert _compile_count(_cached(_scaled_kernel_factory(triple)), values, tripled) > 0
    np.testing.assert_array_equal(doubled, 2 * values)
    np.testing.assert_array_equal(tripled, 3 * values)

    # Fresh helpers and kernels (new dispatchers, as in another process) hit their own entries.
    double, triple = _helpers()
    again = np.empty(4)
    assert _compile_count(_cached(_scaled_kernel_factory(triple)), values, again) == 0
    np.testing.assert_array_equal(again, 3 * values)
    assert _compile_count(_cached(_scaled_kernel_factory(double)), values, again) == 0
    np.testing.assert_array_equal(again, 2 * values)


def test_cpu_kernels_are_cached_on_disk(cache_dir):
    def fill(out, value):
        for i in numba.prange(out.size):
            out[i] = value

    out = np.empty(3)
    assert _compile_count(cpu_kernel(fill), out, 1.5) > 0
    assert _compile_count(cpu_kernel(fill), out, 2.5) == 0
    np.testing.assert_array_equal(out, 2.5)
    assert list(cache_dir.rglob("*fill*.nbc"))


def test_fingerprint_follows_everything_a_kernel_is_compiled_from(tmp_path):
    double, triple = _helpers()
    kernel = _scaled_kernel_factory(double)
    assert fingerprint(kernel) == fingerprint(_scaled_kernel_factory(_helpers()[0]))
    assert fingerprint(kernel) != fingerprint(_scaled_kernel_factory(triple))
    # Helper options are part of what is compiled.
    fast = numba.njit(fastmath=True)(double.py_func)
    assert fingerprint(kernel) != fingerprint(_scaled_kernel_factory(fast))

    # Closure constants, and globals of a helper's module (a source file of its own).
    def scaled_by(factor):
        return lambda v: factor * v

    assert fingerprint(scaled_by(2.0)) != fingerprint(scaled_by(2.5))
    module = tmp_path / "helper_module.py"
    module.write_text("SCALE = 2.0\ndef scale(v):\n    return SCALE * v\n")
    namespace: dict = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    before = fingerprint(_scaled_kernel_factory(numba.njit(namespace["scale"])))
    namespace["SCALE"] = 4.0
    assert fingerprint(_scaled_kernel_factory(numba.njit(namespace["scale"]))) != before
