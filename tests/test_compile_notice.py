"""The first-compile line on stderr and ``python -m pydeform warmup``.

Fresh processes with an empty temporary ``NUMBA_CACHE_DIR``, on the CenterNet focal loss and
targets (the family that compiles fastest); the GPU rules (Numba CUDA launches, CuPy module
builds) with stand-ins for the dispatcher and CuPy's cache folder.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from pydeform.backends import compile_notice
from pydeform.benchmark_cases import OPS
from pydeform._warmup import WARMUP

REPO = Path(__file__).resolve().parents[1]

# Two ops of the centernet family, forward and backward, in one process; prints the number of
# Numba compiles as the last stdout line.
FOCAL_LOSS_AND_TARGETS = textwrap.dedent(
    """
    import numpy as np
    from numba.core import event
    import pydeform

    rng = np.random.default_rng(0)
    pred = rng.uniform(0.1, 0.9, (1, 2, 4, 4)).astype(np.float32)
    target = rng.uniform(0.0, 1.0, (1, 2, 4, 4)).astype(np.float32)
    target[0, 0, 1, 1] = 1
    boxes, labels = np.array([[[0, 0, 8, 8]]], np.float32), np.array([[1]])
    with event.install_recorder("numba:compile") as compiles:
        pydeform.centernet_focal_loss(pred, target)
        pydeform.centernet_focal_loss_backward(np.ones((), np.float32), pred, target)
        pydeform.centernet_targets(boxes, labels, 2, (4, 4))
    print(len(compiles.buffer))
    """
)


def _run(arguments: list, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, *arguments], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _notices(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("pydeform: compiling")]


def test_first_compile_is_announced_once_and_a_warm_cache_is_silent(tmp_path):
    cold = _run(["-c", FOCAL_LOSS_AND_TARGETS], tmp_path)
    assert int(cold.stdout.split()[-1]) > 1  # several kernels compiled ...
    (notice,) = _notices(cold.stderr)  # ... and announced once
    assert "Numba CPU kernels of the centernet ops" in notice
    assert str(tmp_path) in notice and "one-time" in notice and "python -m pydeform warmup" in notice
    warm = _run(["-c", FOCAL_LOSS_AND_TARGETS], tmp_path)
    assert int(warm.stdout.split()[-1]) == 0
    assert warm.stderr == ""


def test_warmup_of_one_op_leaves_nothing_to_compile(tmp_path):
    warmup = _run(["-m", "pydeform", "warmup", "--op", "centernet_focal_loss", "--op", "centernet_targets",
                   "--device", "cpu", "--dtype", "float32"], tmp_path)
    lines = warmup.stdout.splitlines()
    assert [line.split()[:3] for line in lines[:2]] == [
        ["centernet_focal_loss", "numba-cpu", "float32"], ["centernet_targets", "numba-cpu", "float32"]]
    assert all("compiled" in line and "kernel(s)" in line for line in lines[:2])
    assert "2/2 done" in warmup.stderr  # the progress bar
    assert not _notices(warmup.stderr)  # warmup reports compiles itself
    after = _run(["-c", FOCAL_LOSS_AND_TARGETS], tmp_path)
    assert int(after.stdout.split()[-1]) == 0
    assert after.stderr == ""
    again = _run(["-m", "pydeform", "warmup", "--op", "centernet_focal_loss", "--device", "cpu", "--dtype",
                  "float32"], tmp_path)
    assert "nothing to compile" in again.stdout.splitlines()[0]


def test_warmup_covers_every_op():
    assert tuple(WARMUP) == OPS


def test_warmup_on_the_gpu_without_one_says_why(capsys):
    from pydeform.__main__ import main
    from pydeform.selftest import discover_backends

    if any(backend.on_gpu for backend in discover_backends()[0]):
        pytest.skip("a GPU backend is usable here")
    assert main(["warmup", "--device", "gpu"]) == 1
    assert "no GPU backend usable here" in capsys.readouterr().err


@pytest.fixture
def fresh(monkeypatch):
    """No family announced yet in this process."""
    monkeypatch.setattr(compile_notice, "_announced", set())


def _stand_in_kernel(module: str):
    misses = collections.Counter()
    return types.SimpleNamespace(py_func=types.SimpleNamespace(__module__=module),
                                 stats=types.SimpleNamespace(cache_misses=misses)), misses


def test_numba_cuda_launch_announces_only_a_compile(fresh, capsys, monkeypatch):
    monkeypatch.setattr(compile_notice, "numba_cache_folder", lambda: "/numba/cache")
    kernel, misses = _stand_in_kernel("pydeform.backends.numba_kernels.roi")
    with compile_notice.watching_numba_cuda_launch(kernel):
        pass  # loaded from the cache: no miss
    assert capsys.readouterr().err == ""
    for _ in range(2):
        with compile_notice.watching_numba_cuda_launch(kernel):
            misses["(float32,)"] += 1  # compiled
    (line,) = capsys.readouterr().err.splitlines()
    assert "Numba CUDA kernel of the roi ops" in line and "/numba/cache" in line


def test_cupy_build_announces_only_a_build_that_wrote_the_cache(fresh, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    with compile_notice.watching_cupy_build("deform_conv.cu", "float"):
        pass  # loaded: nothing written
    assert capsys.readouterr().err == ""
    with compile_notice.watching_cupy_build("deform_conv.cu", "float"):
        (tmp_path / "0123.cubin").write_bytes(b"compiled")
    with compile_notice.watching_cupy_build("deform_conv.cu", "double"):
        (tmp_path / "4567.cubin").write_bytes(b"compiled")
    (line,) = capsys.readouterr().err.splitlines()
    assert "CUDA C kernels of the deform_conv2d ops for float" in line and str(tmp_path) in line


def test_cupy_build_in_memory_is_always_a_compile(fresh, capsys, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    with compile_notice.watching_cupy_build("roi.cu", "__half"):
        pass
    (line,) = capsys.readouterr().err.splitlines()
    assert "roi ops for __half" in line and "every process compiles them again" in line


def test_shared_helpers_belong_to_no_family():
    assert compile_notice.family_of("pydeform.backends.numba_kernels.layout") is None
    assert compile_notice.family_of("pydeform.backends.numba_kernels.centernet") == "centernet"
    assert compile_notice.family_of("centernet.cu") == "centernet"


def test_scalar_argument_types_share_one_compiled_kernel():
    """NumPy scalars and ints for float arguments reach the kernels as the same Python types, so
    they never compile another specialisation of a kernel already compiled (docs/benchmarks.md)."""
    import numpy as np
    from numba.core import event

    import pydeform

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    offset = rng.standard_normal((1, 18, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    rois = np.array([[0, 0.5, 1.0, 4.5, 5.0]], np.float32)
    pydeform.roi_align(x, rois, 2, spatial_scale=0.5, sampling_ratio=2)
    pydeform.deform_conv2d(x, offset, weight, padding=1)
    with event.install_recorder("numba:compile") as compiles:
        pydeform.roi_align(x, rois, np.int64(2), spatial_scale=np.float32(0.5), sampling_ratio=np.int32(2))
        pydeform.roi_align(x, rois, (2, 2), spatial_scale=1, sampling_ratio=0, aligned=True, mode="max")
        pydeform.deform_conv2d(x, offset, weight, padding=np.int32(1), stride=(np.int64(1), 1))
    assert compiles.buffer == []
