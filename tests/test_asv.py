"""The asv benchmark suite imports and passes ``asv check``, and its CPU peers compute the same thing."""

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_asv_check_passes():
    pytest.importorskip("asv")
    result = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--config", "asv_benchmarks/asv.conf.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout


@pytest.fixture
def suite(monkeypatch):
    """Imports a module of the suite as asv does: ``benchmarks`` is a package in asv_benchmarks/."""
    monkeypatch.syspath_prepend(str(ROOT / "asv_benchmarks"))
    return lambda name: importlib.import_module(f"benchmarks.{name}")


def test_onnxruntime_peer_computes_the_benchmarked_layer(suite):
    """The peer and pydeform time the same computation (on a small shape of the same layer)."""
    pytest.importorskip("onnxruntime")
    benchmarks = suite("deform_conv")
    arrays = benchmarks.layer_arguments((1, 8, 9, 7))
    expected = benchmarks.pydeform_forward(arrays)()
    actual = benchmarks.onnxruntime_forward(arrays)()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_alternating_medians_times_every_function(suite):
    timing = suite("timing")
    calls = []
    medians = timing.alternating_medians([lambda: calls.append("a"), lambda: calls.append("b")], rounds=2)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    # Per round: one untimed call, then a block of timed ones, for each function in turn.
    assert calls == (["a"] * (timing.BLOCK + 1) + ["b"] * (timing.BLOCK + 1)) * 2


def float32_bins_differ(rois, spatial_scale, pooled):
    """Per roi: whether roi_pool's bin edges computed as ORT and torchvision do, in float32 from
    the rounded bin size, differ from SPEC's exact ones (pydeform), e.g. a 57-pixel roi in 7
    bins: 7 * float32(57 / 7) = 57.000003, whose ceil includes one pixel more."""
    ends = np.sign(rois[:, 1:]) * np.floor(np.abs(rois[:, 1:] * spatial_scale) + 0.5)
    sizes = np.maximum(ends[:, 2:] - ends[:, :2] + 1, 1)[:, :, None]  # [K, 2, 1]
    steps = np.arange(pooled + 1)
    rounded = steps.astype(np.float32) * (sizes.astype(np.float32) / np.float32(pooled))
    exact = steps * sizes / pooled
    return ((np.floor(rounded) != np.floor(exact)) | (np.ceil(rounded) != np.ceil(exact))).any(axis=(1, 2))


def test_roi_peers_compute_the_benchmarked_ops(suite):
    """Each RoI comparison of compare_cpu.py times pydeform and ORT on the same computation
    (MaxRoiPool: apart from the rois whose float32 bin edges differ from the exact ones)."""
    pytest.importorskip("onnxruntime")
    roi = suite("roi")
    _, rois, _ = roi.cpu_arguments()
    differing = float32_bins_differ(rois, roi.SPATIAL_SCALE, roi.CPU_OUTPUT_SIZE)
    assert 0 < differing.sum() < len(rois) // 10
    for comparison in roi.roi_align_comparisons() + roi.roi_pool_comparisons():
        expected, actual = comparison.pydeform(), comparison.peer()
        if "MaxRoiPool" in comparison.peer_name:
            expected, actual = expected[~differing], actual[~differing]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=comparison.label)


def test_benchmark_rois_have_the_standard_sizes(suite):
    roi = suite("roi")
    rois = roi.random_rois(roi.GPU_ROIS, roi.GPU_MAP)
    image_height, image_width = (size * roi.STRIDE for size in roi.GPU_MAP[2:])
    sides = rois[:, 3:] - rois[:, 1:3]
    assert rois.shape == (roi.GPU_ROIS, 5) and set(np.unique(rois[:, 0])) == {0, 1}
    assert sides.min() >= roi.ROI_SIDES[0] - 1e-3 and sides.max() <= roi.ROI_SIDES[1] + 1e-3
    assert rois[:, 1:3].min() >= 0
    assert np.all(rois[:, 3] <= image_width) and np.all(rois[:, 4] <= image_height)
