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
