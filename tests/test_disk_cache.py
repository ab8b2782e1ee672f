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

# Runs deform_conv2d and roi_align forward (a few kernels: a cold compile of all of them takes
# minutes on two cores) with the backend named by argv[1] (numba-cpu, numba-cuda or cupy) and
# prints, as JSON, how many kernels were compiled, the first and second call times of
# deform_conv2d (after Numba's one-time set-up, which every Numba program pays) and a digest of
# the results.
CHILD = textwrap.dedent(
    """
    import gc, hashlib, json, sys, time
    import numpy as np
    from numba.core import event
    from numba.core.registry import cpu_target
    import pydeform

    backend = sys.argv[1]
    cpu_target.target_context.refresh()  # Numba's one-time set-up, not compilation
    nvrtc_runs = []
    if backend == "numba-cpu":
        xp, option = np, None
    else:
        import cupy
        import cupy.cuda.compiler as compiler

        xp, option = cupy, {"numba-cuda": "numba", "cupy": "cupy"}[backend]
        compile_with_nvrtc = compiler._compile_using_nvrtc_no_warning  # called on a cache miss only

        def counted(*args, **kwargs):
            nvrtc_runs.append(1)
            return compile_with_nvrtc(*args, **kwargs)

        compiler._compile_using_nvrtc_no_warning = counted
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((1, 4, 6, 6), dtype=np.float32))
    offset = xp.asarray(rng.standard_normal((1, 18, 6, 6), dtype=np.float32))
    mask = xp.asarray(rng.random((1, 9, 6, 6), dtype=np.float32))
    weight = xp.asarray(rng.standard_normal((4, 4, 3, 3), dtype=np.float32))
    rois = xp.asarray(np.array([[0, 0.5, 1.0, 4.5, 5.0]], np.float32))

    def convolve():
        y = pydeform.deform_conv2d(x, offset, weight, padding=1, mask=mask, backend=option)
        if xp is not np:
            xp.cuda.Device().synchronize()
        return y

    with event.install_recorder("numba:compile") as compiles:
        start = time.perf_counter()
        y = convolve()
        first = time.perf_counter() - start
        start = time.perf_counter()
        convolve()
        second = time.perf_counter() - start
        pooled = pydeform.roi_align(x, rois, 2, sampling_ratio=2, aligned=True, backend=option)
    # Numba CUDA kernels count their disk-cache misses (compilations) per dispatcher.
    cuda_misses = sum(sum(o.stats.cache_misses.values()) for o in gc.get_objects()
                      if type(o).__name__ == "CUDADispatcher")
    digest = hashlib.sha256()
    for array in (y, pooled):
        digest.update(np.asarray(array.get() if xp is not np else array).tobytes())
    print(json.dumps({"compiles": len(compiles.buffer) + cuda_misses + len(nvrtc_runs), "first": first,
                      "second": second, "digest": digest.hexdigest()}))
    """
)


def _run_child(cache_dir: Path, backend: str = "numba-cpu") -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir / "numba"), CUPY_CACHE_DIR=str(cache_dir / "cupy"),
               PYTHONPATH=str(REPO))
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    done = subprocess.run([sys.executable, "-c", CHILD, backend], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_second_process_compiles_nothing(cache_dir: Path, backend: str, files: str) -> None:
    cold = _run_child(cache_dir, backend)
    assert cold["compiles"] > 0
    written = sorted(cache_dir.rglob(files))
    assert written
    warm = _run_child(cache_dir, backend)
    assert warm["compiles"] == 0, "a kernel was compiled although the disk cache held it"
    assert sorted(cache_dir.rglob(files)) == written
    assert warm["digest"] == cold["digest"]
    # docs/benchmarks.md: first call <= 0.5 s over a warm call once the cache is warm (printed with -s).
    print(f"\n{backend}: first call, cold cache {cold['first']:.3f} s; warm cache {warm['first']:.3f} s; "
          f"warm call {warm['second']:.4f} s")
    assert warm["first"] < cold["first"]


def test_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    _check_second_process_compiles_nothing(tmp_path, "numba-cpu", "*.nbc")


@pytest.mark.gpu
@pytest.mark.parametrize("backend, files", [("numba-cuda", "*.nbc"), ("cupy", "*.cubin")])
def test_gpu_kernels_load_from_the_disk_cache_in_a_second_process(tmp_path, backend, files):
    _check_second_process_compiles_nothing(tmp_path, backend, files)


def test_cuda_sources_are_the_same_text_in_every_process():
    """CuPy keys its disk cache by the source text, among others: the inlined sources must not
    depend on the process (a path, an order of a set), or every process would compile again."""
    script = ("import hashlib; from pydeform.backends.cupy_kernels._compile import KERNEL_DIR, kernel_source; "
              "print({p.name: hashlib.sha256(kernel_source(p.name).encode()).hexdigest() "
              "for p in sorted(KERNEL_DIR.glob('*.cu'))})")
    runs = [subprocess.run([sys.executable, "-c", script], cwd=tmp, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           capture_output=True, text=True, timeout=120).stdout
            for tmp in (REPO, REPO / "tests")]
    assert runs[0] == runs[1] and "roi.cu" in runs[0] and "deform_conv.cu" in runs[0]


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
    # So are the kernel's own options (Numba's key leaves them out).
    assert fingerprint(numba.njit(kernel)) != fingerprint(numba.njit(parallel=True)(kernel))
    assert fingerprint(numba.njit(kernel)) == fingerprint(numba.njit(_scaled_kernel_factory(_helpers()[0])))

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


def test_kernels_run_as_python_with_numba_jit_disabled():
    script = ("import numpy as np; from pydeform.backends.numba_kernels.targets import cpu_kernel\n"
              "import numba\n"
              "def fill(out):\n"
              "    for i in numba.prange(out.size):\n"
              "        out[i] = i\n"
              "kernel = cpu_kernel(fill); out = np.zeros(3); kernel(out)\n"
              "print(kernel is fill, out.tolist())")
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, NUMBA_DISABLE_JIT="1",
                          PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[0.0,", "1.0,", "2.0]"]
