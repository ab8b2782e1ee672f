"""``python -m pydeform bench`` and ``demo`` (``info`` and ``selftest``: tests/test_selftest.py).

Small CPU runs: one quick case, one round, outputs into temporary paths.
"""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest

from pydeform import _bench, _demo, benchmark_cases
from pydeform.__main__ import main
from pydeform.selftest import NUMBA_CPU, Backend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEASUREMENT_FIELDS = {"case", "op", "device", "workload", "dtype", "timed", "implementation", "median_ms", "peer",
                      "error", "speedup"}


def _png_size(path) -> tuple:
    """(width, height) from the IHDR chunk of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_bench_quick_roi_align_writes_table_json_and_png(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--quick", "--op", "roi_align", "--device", "cpu", "--rounds", "1",
            "--json", str(json_path), "--png", str(png_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    case = benchmark_cases.cases("roi_align", "cpu", quick=True)[0]

    results = json.loads(json_path.read_text())
    assert results["command"] == ["python", "-m", "pydeform", *argv]
    assert {"pydeform", "numpy", "numba", "onnxruntime"} <= results["versions"].keys()
    rows = {(m["timed"], m["implementation"]): m for m in results["measurements"]}
    assert set(rows) == {("forward", "numba-cpu"), ("forward", "peer"), ("forward+backward", "numba-cpu")}
    for m in rows.values():
        assert set(m) == MEASUREMENT_FIELDS
        assert (m["case"], m["op"], m["device"], m["dtype"]) == (case.id, "roi_align", "cpu", "float32")
        assert m["peer"] == case.peer and m["error"] is None
        assert m["median_ms"] > 0
    ours, peer = rows[("forward", "numba-cpu")], rows[("forward", "peer")]
    assert ours["speedup"] == pytest.approx(peer["median_ms"] / ours["median_ms"])
    assert rows[("forward+backward", "numba-cpu")]["speedup"] is None  # ONNX Runtime has no backward

    lines = out.splitlines()
    assert lines[0].split() == ["case", "dtype", "pass", "backend", "median", "ms", "peer", "ms", "peer", "/",
                                "pydeform"]
    forward_row = next(line.split() for line in lines if line.startswith(case.id) and " forward " in line)
    assert forward_row[:4] == [case.id, "float32", "forward", "numba-cpu"]
    assert float(forward_row[4]) == pytest.approx(ours["median_ms"], abs=1e-3)
    assert float(forward_row[6]) == pytest.approx(ours["speedup"], abs=0.01)
    assert f"peer of {case.id}: {case.peer}" in out
    assert "GPU cases not run" not in out  # --device cpu asked for none
    assert f"0/1 timing {case.id} float32" in err and "1/1 done" in err

    width, height = _png_size(png_path)
    assert width >= 600 and height >= 100 and png_path.stat().st_size > 5000


def test_bench_runs_the_level_set_ops_beside_scikit_image(tmp_path, monkeypatch, capsys):
    """Every level-set op has its cases in the bench (here on 32x32 images: the standard 512x512
    keeps scikit-image busy for seconds a call), timed beside scikit-image."""
    pytest.importorskip("skimage")
    levelset = benchmark_cases.levelset
    monkeypatch.setattr(levelset, "standard_cases", lambda: (
        case for device in ("gpu", "cpu") for case in levelset.level_set_cases(device, side=32)))
    json_path = tmp_path / "bench.json"
    for op in levelset.OPS:
        assert main(["bench", "--quick", "--op", op, "--device", "cpu", "--rounds", "1", "--json", str(json_path)]) == 0
        (case,) = benchmark_cases.cases(op, "cpu", quick=True)
        rows = {m["implementation"]: m for m in json.loads(json_path.read_text())["measurements"]}
        assert set(rows) == {"numba-cpu", "peer"} and rows["peer"]["peer"].startswith("scikit-image")
        assert rows["numba-cpu"]["case"] == case.id and rows["numba-cpu"]["speedup"] > 0
        assert f"peer of {case.id}: {case.peer}" in capsys.readouterr().out


def _measurement(implementation, ms, timed="forward", case="op/cpu/a", error=None):
    return _bench.Measurement(case, "op", "cpu", "shape", "float32", timed, implementation, ms, "a peer", error)


def test_ratios_table_and_failures_from_measurements(tmp_path):
    report = _bench.Report([
        _measurement("numba-cpu", 2.0), _measurement(_bench.PEER, 5.0),
        _measurement("numba-cpu", 4.0, "forward+backward"),
        _measurement("numba-cpu", None, case="op/cpu/b", error="RuntimeError: boom"),
        _measurement(_bench.PEER, 1.0, case="op/cpu/b"),
    ], ["a note"])
    assert _bench.speedups(report.measurements) == {("op/cpu/a", "float32", "forward", "numba-cpu"): 2.5}
    assert _bench.table_rows(report) == [
        ("op/cpu/a", "float32", "forward", "numba-cpu", "2.000", "5.000", "2.50"),
        ("op/cpu/a", "float32", "forward+backward", "numba-cpu", "4.000", "-", "-"),
        ("op/cpu/b", "float32", "forward", "numba-cpu", "FAILED", "1.000", "-"),
    ]
    assert [m.case for m in report.failed] == ["op/cpu/b"]
    png = tmp_path / "chart.png"
    _bench.plot(report, png)
    assert _png_size(png)[0] > 0


def test_chart_legend_names_each_peer():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    def measured(implementation, peer, case):
        return _bench.Measurement(case, "op", "cpu", "shape", "float32", "forward", implementation, 2.0, peer)

    report = _bench.Report([
        measured("numba-cpu", "onnxruntime RoiAlign (CPU)", "roi_align/cpu/a"),
        measured(_bench.PEER, "onnxruntime RoiAlign (CPU)", "roi_align/cpu/a"),
        measured("numba-cpu", "PyTorch decode", "centernet_decode/cpu/a"),
        measured(_bench.PEER, "PyTorch decode", "centernet_decode/cpu/a"),
    ], [])
    figure = _bench.chart(report)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    plt.close(figure)
    assert labels == ["numba-cpu", "onnxruntime RoiAlign (CPU)", "PyTorch decode"]


def test_a_failing_pydeform_call_fails_the_bench(monkeypatch, capsys):
    def broken(case, arrays, backend=None):
        def fail():
            raise RuntimeError("kernel exploded")

        return benchmark_cases.Calls(fail, fail)

    monkeypatch.setattr(benchmark_cases, "pydeform_calls", broken)
    # deform_psroi_pool has no peer: nothing else runs.
    assert main(["bench", "--quick", "--op", "deform_psroi_pool", "--device", "cpu", "--rounds", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: deform_psroi_pool/cpu/" in out and "RuntimeError: kernel exploded" in out
    assert out.count(" FAILED") == 2  # forward and forward+backward rows


def test_gpu_cases_are_named_as_not_run_without_a_gpu_backend():
    report = _bench.run_benchmarks(op="centernet_targets", device="gpu", backends=[NUMBA_CPU])
    assert report.measurements == []
    assert report.notes == ["GPU cases not run: no GPU backend is usable here (see python -m pydeform info)"]


@pytest.mark.parametrize("argv", [
    ["bench", "--op", "no_such_op"], ["bench", "--rounds", "0"], ["demo", "--bad"],
    ["bench", "--json", "no/such/folder/bench.json"], ["bench", "--png", "no/such/folder/bench.png"],
    ["demo", "--out", "no/such/folder/demo.png"],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo():
    return _demo.build()


def test_demo_decodes_every_object(demo):
    kept = demo.detections[demo.detections[:, 5] >= 0]
    # The heatmap is the targets' (peaks 0.9 above noise below the threshold) and wh / reg
    # are the targets' at the centres: decoding gives back the boxes and classes exactly.
    expected = sorted((float(label), x1, y1, x2, y2) for label, x1, y1, x2, y2 in _demo.OBJECTS)
    got = sorted((row[5], *row[:4]) for row in kept.tolist())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(kept[:, 4], 0.9, atol=1e-6)


def test_demo_points_are_where_the_ops_sample(demo):
    grid = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float64)
    for pixel, regular, deformed, (_, x1, y1, x2, y2) in zip(
        demo.pixels, demo.regular_points, demo.deformed_points, _demo.OBJECTS
    ):
        np.testing.assert_allclose(regular, np.array(pixel) + grid, atol=1e-4)
        offsets = _demo.spreading_offsets(pixel, (x1, y1, x2, y2))
        np.testing.assert_allclose(deformed, np.array(pixel) + grid + offsets, atol=1e-3)
        # The moved points span 80% of the object's box (in pixel-centre coordinates).
        assert deformed[:, 0].min() == pytest.approx((y1 + y2) / 2 - 0.5 - 0.4 * (y2 - y1), abs=1e-3)
        assert deformed[:, 1].max() == pytest.approx((x1 + x2) / 2 - 0.5 + 0.4 * (x2 - x1), abs=1e-3)
    # aligned RoI Align, sampling_ratio 2: sample s of bin i at x1 - 0.5 + (2i + s + 0.5) * bin / 2.
    x1, y1, x2, y2 = demo.roi.astype(np.float64)
    steps = (np.arange(2 * _demo.ROI_BINS) + 0.5) / (2 * _demo.ROI_BINS)
    np.testing.assert_allclose(demo.roi_samples[:, 0, 0], y1 - 0.5 + steps * (y2 - y1), atol=1e-3)
    np.testing.assert_allclose(demo.roi_samples[0, :, 1], x1 - 0.5 + steps * (x2 - x1), atol=1e-3)


def test_demo_snake_shrinks_onto_the_shapes(demo):
    """The snake panel's level sets: the start box at iteration 0, shrinking, and at the end the
    shapes (one stray pixel at most per 100 is allowed by the 0.99 IoU)."""
    assert sorted(demo.snake) == list(_demo.SNAKE_DRAWN)
    start = demo.snake[0]
    margin = _demo.SNAKE_MARGIN
    assert start[margin:-margin, margin:-margin].all() and start.sum() == (_demo.IMAGE_SIZE - 2 * margin) ** 2
    areas = [int(demo.snake[i].sum()) for i in _demo.SNAKE_DRAWN]
    assert areas == sorted(areas, reverse=True)
    shapes = np.logical_or.reduce(_demo.object_masks())
    final = demo.snake[_demo.SNAKE_ITERATIONS] == 1
    assert (final & shapes).sum() / (final | shapes).sum() > 0.99


def test_demo_regular_grid_markers_can_be_told_apart(demo):
    """Some axes draws a pixel's regular 3x3 grid with its points further apart on screen than
    a marker is wide (in the whole image they are ~3 screen pixels apart: one blob)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figure = _demo.figure(demo)
    figure.canvas.draw()
    regular = {tuple(np.round(points, 3).ravel()) for points in demo.regular_points}
    separable = []
    for axes in figure.axes + [child for parent in figure.axes for child in parent.child_axes]:
        for collection in axes.collections:
            offsets = np.asarray(collection.get_offsets(), np.float64)
            if len(offsets) != 9 or tuple(np.round(offsets[:, ::-1], 3).ravel()) not in regular:
                continue
            on_screen = axes.transData.transform(offsets) * _demo.DPI / figure.dpi
            spacing = np.abs(np.diff(on_screen[:3, 0])).min()
            diameter = np.sqrt(collection.get_sizes().max()) * _demo.DPI / 72
            separable.append(spacing > 1.5 * diameter)
    plt.close(figure)
    assert separable and any(separable)


def test_demo_command_writes_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert main(["demo", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert sorted(line.split()[0] for line in out.splitlines()[:-1]) == sorted(_demo.CLASS_NAMES)
    assert out.splitlines()[-1] == f"wrote {path}"
    width, height = _png_size(path)
    assert width > 2 * height > 600 and path.stat().st_size > 20000


def test_info_names_the_kernel_cache_folders(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cupy"))
    monkeypatch.setattr("numba.config.CACHE_DIR", str(tmp_path / "numba"))
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numba_line = next(line for line in lines if line.startswith("Numba kernel cache: "))
    assert numba_line.removeprefix("Numba kernel cache: ").startswith(str(tmp_path / "numba"))
    assert f"CuPy kernel cache: {tmp_path / 'cupy'}" in lines
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    main(["info"])
    assert "CuPy kernel cache: none, in memory only (CUPY_CACHE_IN_MEMORY is set)" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_in_place_on_a_terminal():
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = _bench._Progress(4, stream)
        bar.show(0, "timing a")
        bar.show(2, "timing c")
        bar.show(4, "done")
    assert terminal.getvalue() == (
        "\r\033[K[" + "." * 30 + "] 0/4 timing a"
        "\r\033[K[" + "#" * 15 + "." * 15 + "] 2/4 timing c"
        "\r\033[K[" + "#" * 30 + "] 4/4 done\n"
    )
    assert log.getvalue().splitlines() == [
        "[" + "." * 30 + "] 0/4 timing a", "[" + "#" * 15 + "." * 15 + "] 2/4 timing c", "[" + "#" * 30 + "] 4/4 done",
    ]


@pytest.mark.parametrize("argv", [["demo", "--out", "unused.png"], ["bench", "--png", "unused.png"]])
def test_pictures_without_matplotlib_say_what_to_install(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "unused.png").exists()


def test_gpu_measurements_with_a_stand_in_for_cupy(monkeypatch):
    """The GPU path without a GPU: CuPy's events replaced by a clock that reports the cost of the
    last call, pydeform's and the peer's calls by stand-ins with known costs."""
    last_cost = [0.0]

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    fake_cupy = types.SimpleNamespace(
        asarray=np.asarray, cuda=types.SimpleNamespace(Event=Event, get_elapsed_time=lambda start, stop: last_cost[0])
    )
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)

    def costing(cost):
        def call():
            last_cost[0] = cost

        return call

    def broken():
        raise RuntimeError("launch failed")

    small_inputs = {"input": np.ones((1, 2, 3, 3), np.float32), "rois": np.zeros((1, 5), np.float32),
                    "grad_output": np.ones((1, 2, 2, 2), np.float32)}  # the standard shapes take seconds to draw
    monkeypatch.setattr(benchmark_cases, "host_inputs", lambda case, seed=0: small_inputs)

    def pydeform_calls(case, arrays, backend=None):
        assert set(arrays) == set(small_inputs)
        assert arrays["input"].dtype.name in case.dtypes and arrays["rois"].dtype == np.float32
        if backend == "cupy":
            return benchmark_cases.Calls(costing(1.0), costing(2.0))
        return benchmark_cases.Calls(costing(1.5), broken)

    monkeypatch.setattr(benchmark_cases, "pydeform_calls", pydeform_calls)
    monkeypatch.setattr(benchmark_cases, "peer_calls",
                        lambda case, host, dtype: benchmark_cases.Calls(costing(3.0), costing(6.0)))
    backends = [NUMBA_CPU, Backend("cupy", fake_cupy, "cupy", ("float32", "bfloat16")),
                Backend("numba-cuda", fake_cupy, "numba", ("float32",))]
    report = _bench.run_benchmarks(op="roi_align", device="gpu", quick=True, backends=backends,
                                   progress=io.StringIO())
    case = benchmark_cases.cases("roi_align", "gpu", quick=True)[0]
    assert case.dtypes == ("float32", "bfloat16")
    got = {(m.dtype, m.timed, m.implementation): m.median_ms for m in report.measurements}
    assert got == {
        ("float32", "forward", "cupy"): 1.0, ("float32", "forward", "numba-cuda"): 1.5,
        ("float32", "forward", "peer"): 3.0, ("float32", "forward+backward", "cupy"): 2.0,
        ("float32", "forward+backward", "numba-cuda"): None, ("float32", "forward+backward", "peer"): 6.0,
        ("bfloat16", "forward", "cupy"): 1.0, ("bfloat16", "forward", "peer"): 3.0,
        ("bfloat16", "forward+backward", "cupy"): 2.0, ("bfloat16", "forward+backward", "peer"): 6.0,
    }
    assert all(m.case == case.id and m.device == "gpu" for m in report.measurements)
    assert [m.error for m in report.failed] == ["RuntimeError: launch failed"]
    ratios = _bench.speedups(report.measurements)
    assert ratios[(case.id, "float32", "forward", "numba-cuda")] == 2.0
    assert ratios[(case.id, "bfloat16", "forward+backward", "cupy")] == 3.0
    assert report.notes == []


@pytest.mark.gpu
def test_bench_quick_roi_align_on_the_gpu(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--op", "roi_align", "--device", "gpu", "--rounds", "3",
                 "--json", str(json_path)]) == 0
    measurements = json.loads(json_path.read_text())["measurements"]
    ours = {(m["dtype"], m["timed"], m["implementation"]) for m in measurements
            if m["implementation"] != _bench.PEER and m["median_ms"] > 0}
    assert ours == {(dtype, timed, backend) for dtype in ("float32", "bfloat16")
                    for timed in ("forward", "forward+backward") for backend in ("cupy", "numba-cuda")}
    out = capsys.readouterr().out
    assert "roi_align/gpu/" in out and "FAILED" not in out


def test_bench_times_the_instance_mean_loss_beside_its_torch_peer(monkeypatch, tmp_path):
    """``bench --op instance_mean_loss`` (a choice of --op, as every op of the benchmark cases):
    pydeform's forward and forward + backward (the statistics passed on) and the PyTorch peer's,
    on small stand-ins for the standard inputs (which take seconds to run)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    small_inputs = {"psi": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
                    "labels": benchmark_cases.semiconv.block_labels(rng, 2, 8, 32),
                    "grad_output": np.asarray(1.5, np.float32)}
    monkeypatch.setattr(benchmark_cases, "host_inputs", lambda case, seed=0: small_inputs)
    json_path = tmp_path / "bench.json"
    assert main(["bench", "--op", "instance_mean_loss", "--device", "cpu", "--rounds", "1",
                 "--json", str(json_path)]) == 0
    rows = {(m["timed"], m["implementation"]): m for m in json.loads(json_path.read_text())["measurements"]}
    assert set(rows) == {(timed, implementation) for timed in ("forward", "forward+backward")
                         for implementation in ("numba-cpu", "peer")}
    assert all(m["median_ms"] > 0 and m["error"] is None for m in rows.values())
    assert rows[("forward+backward", "numba-cpu")]["speedup"] > 0
