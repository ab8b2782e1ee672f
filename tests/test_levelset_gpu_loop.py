"""The level-set driver on CuPy arrays with the CuPy RawKernels, checked without a GPU through the
stand-ins of tests/fake_cupy.py (kernels do not run there; launches and reads are recorded):
the launches of each iteration, no read back to the host inside the snake loops, and exactly one
read per Chan-Vese iteration (its stopping test); the Numba CUDA kernel set reads the same."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import pydeform
from fake_cupy import FakeCupy, _FakeArrayBase, fake_gpu  # noqa: F401 (a fixture)


@pytest.fixture
def reads(fake_gpu, monkeypatch):
    """The device-to-host reads the op makes: asnumpy, Python scalars of arrays, and the NumPy
    scalars the stand-in gives where CuPy gives a 0-d device array (an element, a full
    reduction), which code could only use on the host."""
    recorded = []
    wrap = FakeCupy.wrap

    def wrap_recording_scalars(self, result, sources):
        if isinstance(result, np.generic) and sources:
            recorded.append("scalar")
        return wrap(self, result, sources)

    monkeypatch.setattr(FakeCupy, "wrap", wrap_recording_scalars)

    def recording(name, read):
        def call(*args):
            recorded.append(name)
            return read(*args)

        return call

    monkeypatch.setattr(FakeCupy, "asnumpy", recording("asnumpy", FakeCupy.asnumpy))
    for name in ("__bool__", "__float__", "__int__"):
        monkeypatch.setattr(_FakeArrayBase, name, recording(name, getattr(_FakeArrayBase, name)))
    return recorded


def launches(fake):
    return collections.Counter(event[1] for event in fake.events if event[0] == "launch")


@pytest.mark.parametrize("shape", [(6, 7), (2, 4, 5, 6)], ids=["2d", "batched 3d"])
@pytest.mark.parametrize("smoothing", [0, 2])
def test_acwe_launches_three_kernels_and_the_smoothing_per_iteration_and_reads_nothing(fake_gpu, reads, shape,
                                                                                        smoothing):
    image = fake_gpu.asarray(np.random.default_rng(0).random(shape))
    fake_gpu.events.clear()
    pydeform.morphological_chan_vese(image, 4, smoothing=smoothing, batched=len(shape) == 4)
    expected = {"levelset_acwe_partials": 4, "levelset_acwe_means": 4, "levelset_acwe_attach": 4,
                "levelset_curvature": 4 * 2 * smoothing}
    assert launches(fake_gpu) == +collections.Counter(expected)  # + drops the zero counts
    assert reads == []


@pytest.mark.parametrize("balloon, threshold", [(0, "auto"), (-1, "auto"), (2.5, 0.3)])
def test_gac_launches_balloon_attachment_and_smoothing_per_iteration_and_reads_nothing(fake_gpu, reads, balloon,
                                                                                      threshold):
    gimage = fake_gpu.asarray(np.random.default_rng(1).random((6, 7)))
    fake_gpu.events.clear()
    pydeform.morphological_geodesic_active_contour(gimage, 3, smoothing=1, threshold=threshold, balloon=balloon)
    expected = {"levelset_gac_attach": 3, "levelset_curvature": 3 * 2}
    if balloon:
        expected["levelset_gac_balloon"] = 3
    assert launches(fake_gpu) == expected
    assert reads == []


def test_the_callback_is_the_only_reader(fake_gpu, reads):
    image = fake_gpu.asarray(np.random.default_rng(2).random((6, 7)))
    seen = []
    pydeform.morphological_chan_vese(image, 3, iter_callback=lambda u: seen.append(fake_gpu.asnumpy(u)))
    assert len(seen) == 4 and reads == ["asnumpy"] * 4


@pytest.mark.parametrize("batch", [1, 3])
def test_chan_vese_reads_its_stopping_test_once_per_iteration(fake_gpu, reads, batch):
    image = fake_gpu.asarray(np.random.default_rng(3).random((batch, 6, 7)))
    fake_gpu.events.clear()
    # a negative tolerance never stops the run early (the stand-in kernels compute nothing)
    pydeform.chan_vese(image, tol=-1.0, max_num_iter=5, batched=True)
    assert launches(fake_gpu) == {"levelset_chan_vese_sums": 1, "levelset_chan_vese_stats": 1 + 5,
                                  "levelset_chan_vese_step": 5}
    assert reads == ["asnumpy"] * 5


def test_numba_cuda_set_reads_only_the_chan_vese_stopping_test(fake_gpu, reads):
    """The same with the Numba CUDA kernel set (backend="numba"): its launches, and no read in
    the snake loops."""
    image = fake_gpu.asarray(np.random.default_rng(4).random((2, 6, 7)))
    fake_gpu.events.clear()
    pydeform.morphological_chan_vese(image, 3, smoothing=2, batched=True, backend="numba")
    pydeform.morphological_geodesic_active_contour(image, 3, balloon=-1, batched=True, backend="numba")
    assert reads == [] and any(event[0] == "numba launch" for event in fake_gpu.events)
    assert not any(event[0] == "launch" for event in fake_gpu.events), "a CUDA C kernel launched"
    pydeform.chan_vese(image, tol=-1.0, max_num_iter=5, batched=True, backend="numba")
    assert reads == ["asnumpy"] * 5
