"""The level-set benchmark cases (pydeform/benchmark_cases/levelset.py): the standard shapes, peers
that compute what pydeform computes (on smaller images of the same cases: scikit-image takes
seconds at the standard shapes), and the count of kernel launches per iteration, checked on the
CPU with stand-ins for the CuPy launches."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest

import pydeform
from fake_cupy import fake_gpu  # noqa: F401 (a fixture)
from pydeform import _bench
from pydeform import benchmark_cases as bc
from pydeform.backends.cupy_kernels import _compile
from pydeform.benchmark_cases import levelset as cases
from pydeform.selftest import NUMBA_CPU, Backend

SMALL_SIDE = 32


def test_standard_shapes():
    for device in ("gpu", "cpu"):
        found = {case.name: case for case in bc.cases(device=device) if case.op in cases.OPS}
        acwe = found["512x512-35it-smoothing3"]
        assert acwe.op == "morphological_chan_vese" and acwe.options == {"num_iter": 35, "smoothing": 3}
        assert found["64x64x64-10it"].options == {"num_iter": 10}
        batch = found["batch64-128x128-35it-smoothing3"]
        assert batch.options == {"num_iter": 35, "smoothing": 3, "batched": True}
        gac = found["512x512-100it-balloon-1"]
        assert gac.op == "morphological_geodesic_active_contour" and gac.options == {"num_iter": 100, "balloon": -1}
        assert found["512x512-200it"].options == {"max_num_iter": 200, "tol": 0.0}
        assert {case.peer_builder for case in found.values()} == (
            {cases._cucim_calls, cases._loop_calls} if device == "gpu" else {cases._skimage_calls, cases._loop_calls})
        shapes = {name: next(iter(bc.host_inputs(case).values())).shape for name, case in found.items()}
        assert shapes == {"512x512-35it-smoothing3": (512, 512), "64x64x64-10it": (64, 64, 64),
                          "batch64-128x128-35it-smoothing3": (64, 128, 128), "512x512-100it-balloon-1": (512, 512),
                          "512x512-200it": (512, 512)}


def test_scenes_are_integer_valued_with_objects():
    image = cases.scene(np.random.default_rng(0), (64, 48))
    assert image.dtype == np.float32 and np.array_equal(image, np.round(image))
    assert image.min() >= 0 and image.max() <= 255
    assert np.mean(image > 120) > 0.05  # bright balls on the dark background


@pytest.mark.parametrize("case", list(cases.level_set_cases("cpu", SMALL_SIDE)), ids=lambda case: case.id)
def test_cpu_peers_compute_the_benchmarked_op(case):
    """scikit-image (its smoothing phase reset before each call: two calls agree though 35 x 3
    smoothing steps flip its phase) and the single-image loop give pydeform's results."""
    pytest.importorskip("skimage")
    host = bc.host_inputs(case)
    expected = bc.pydeform_calls(case, bc.device_inputs(host, "float32")).forward()
    peer = bc.peer_calls(case, host, "float32").forward
    for _ in range(2):
        actual = peer()
        actual = np.stack(actual) if isinstance(actual, list) else actual
        np.testing.assert_array_equal(actual, expected)


def test_the_phase_reset_fits_cucims_operators_too():
    """cuCIM's port passes the footprints and a workspace to its operators: the reset cycle
    starts at SI(IS(u)) and forwards them."""
    morphsnakes = pytest.importorskip("skimage.segmentation.morphsnakes")
    calls = []
    cucim_like = types.SimpleNamespace(
        _fcycle=morphsnakes._fcycle,
        sup_inf=lambda u, footprints, workspace: calls.append(("SI", footprints, workspace)) or u + 1,
        inf_sup=lambda u, footprints, workspace: calls.append(("IS", footprints, workspace)) or u * 2)
    cases.reset_smoothing_phase(cucim_like)
    assert cucim_like._curvop(1, "f", "w") == 3 and cucim_like._curvop(1, "f", "w") == 4
    assert [name for name, *_ in calls] == ["IS", "SI", "SI", "IS"]
    assert all(rest == ["f", "w"] for _, *rest in calls)


def test_launches_are_counted_per_iteration(monkeypatch):
    """A stand-in op launching 2 kernels of set-up, then per iteration an attachment and two per
    smoothing step, and the CuPy launch function it goes through replaced by a no-op."""
    monkeypatch.setattr(_compile, "_kernel", lambda manifest, template, type_name, device_id: lambda *args: None)

    def stand_in(image, num_iter, smoothing, backend=None):
        assert backend == "cupy" and image == "device image"
        for template in ("start", "copy"):
            _compile._kernel(None, template, "float", 0)((1,), (1,), ())
        for _ in range(num_iter):
            for template in ["attach"] + ["sup_inf", "inf_sup"] * smoothing:
                _compile._kernel(None, template, "float", 0)((1,), (1,), ())

    monkeypatch.setattr(pydeform, "morphological_chan_vese", stand_in)
    case = next(cases.level_set_cases("gpu", SMALL_SIDE))
    stubbed = _compile._kernel
    assert cases.launches_per_iteration(case, {"image": "device image"}, "cupy") == 7
    assert _compile._kernel is stubbed  # restored
    with cases.counting_cupy_launches() as launches:
        stand_in("device image", 1, 1, backend="cupy")
    assert launches == ["start", "copy", "attach", "sup_inf", "inf_sup"]


def test_the_count_sees_every_launch_of_a_cupy_op(fake_gpu):
    """The counter hooks where pydeform's CuPy launches go: a CenterNet decode on stand-in CuPy
    arrays makes as many launches as the stand-in records."""
    rng = np.random.default_rng(0)
    heat, wh, reg = (fake_gpu.asarray(rng.random(shape, dtype=np.float32))
                     for shape in ((1, 2, 6, 6), (1, 2, 6, 6), (1, 2, 6, 6)))
    fake_gpu.events.clear()
    with cases.counting_cupy_launches() as launches:
        pydeform.centernet_decode(heat, wh, reg, 4)
    recorded = [event for event in fake_gpu.events if event[0] == "launch"]
    assert launches and len(launches) == len(recorded)


def test_the_bench_notes_the_launches_per_iteration(monkeypatch):
    """The GPU path with a stand-in for CuPy (as tests/test_cli.py's): each case's CuPy backend
    gets a note with its count, the Numba CUDA backend none."""

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    stand_in = types.SimpleNamespace(asarray=np.asarray,
                                     cuda=types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: 1.0))
    monkeypatch.setitem(sys.modules, "cupy", stand_in)
    monkeypatch.setattr(bc, "host_inputs", lambda case, seed=0: {"image": np.ones((4, 4), np.float32)})
    monkeypatch.setattr(bc, "pydeform_calls", lambda case, arrays, backend=None: bc.Calls(lambda: None, None))
    monkeypatch.setattr(bc, "peer_calls", lambda case, host, dtype: bc.Calls(lambda: None, None))
    counted = []

    def launches(case, arrays, backend):
        counted.append(backend)
        if case.op == "chan_vese":
            raise RuntimeError("no kernels")
        return 5

    monkeypatch.setattr(cases, "launches_per_iteration", launches)
    backends = [NUMBA_CPU, Backend("cupy", stand_in, "cupy", ("float32",)),
                Backend("numba-cuda", stand_in, "numba", ("float32",))]
    report = _bench.run_benchmarks(device="gpu", quick=True, backends=backends, progress=io.StringIO())
    level_set = [case for case in bc.cases(device="gpu", quick=True) if case.op in cases.OPS]
    assert counted == ["cupy"] * len(level_set)
    notes = [note for note in report.notes if note.startswith("launches per iteration")]
    assert notes == [f"launches per iteration of {case.id} float32 (cupy): 5" if case.op != "chan_vese" else
                     f"launches per iteration of {case.id} float32 (cupy) not counted: RuntimeError: no kernels"
                     for case in level_set]


# Kernel launches per iteration at most: a two-stage reduction of the means, the attachment and
# two passes per smoothing step (ACWE, smoothing 3 or 1); the balloon, the attachment and two
# smoothing passes (GAC, smoothing 1); the step and a two-stage reduction (Chan-Vese).
LAUNCH_BOUNDS = {"morphological_chan_vese": 3 + 2 * 3, "morphological_geodesic_active_contour": 2 + 2 * 1,
                 "chan_vese": 3}


def test_level_set_kernels_launch_a_few_kernels_per_iteration(fake_gpu):
    """The CuPy level-set kernel set on stand-in CuPy arrays (the kernels do not run, so
    Chan-Vese, whose stopping test reads their results, is left to the GPU test below)."""
    pytest.importorskip("pydeform.backends.cupy_kernels.levelset")
    for case in cases.level_set_cases("gpu", SMALL_SIDE):
        if case.op != "chan_vese":
            arrays = bc.device_inputs(bc.host_inputs(case), "float32", fake_gpu)
            count = cases.launches_per_iteration(case, arrays, "cupy")
            assert 1 <= count <= LAUNCH_BOUNDS[case.op], (case.id, count)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(cases.level_set_cases("gpu", SMALL_SIDE)), ids=lambda case: case.id)
def test_gpu_peers_compute_the_benchmarked_op(case):
    """The GPU twin of test_cpu_peers_compute_the_benchmarked_op: the single-image loop on CuPy
    arrays gives the same level sets, cuCIM (where installed; its attachment is computed in a
    fused CuPy kernel, with its own rounding) the same on all but 1% of the pixels; and the
    launch count is within the CPU test's bound."""
    import cupy

    host = bc.host_inputs(case)
    arrays = bc.device_inputs(host, "float32", cupy)
    expected = cupy.asnumpy(bc.pydeform_calls(case, arrays).forward())
    assert 1 <= case.launches(case, arrays, "cupy") <= LAUNCH_BOUNDS[case.op]
    try:
        peer = bc.peer_calls(case, host, "float32").forward
    except bc.PeerUnavailable as error:
        pytest.skip(str(error))
    actual = peer()
    if isinstance(actual, list):
        np.testing.assert_array_equal(np.stack([cupy.asnumpy(a) for a in actual]), expected)
    else:
        assert np.mean(cupy.asnumpy(actual) != expected) <= 0.01
