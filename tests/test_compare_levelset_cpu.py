"""The level-set CPU comparison script of docs/benchmarks.md runs, reports every time and ratio,
and finds pydeform's results equal to scikit-image's (tiny shapes)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("skimage")
SCRIPT = Path(__file__).resolve().parents[1] / "asv_benchmarks" / "compare_levelset_cpu.py"


@pytest.mark.parametrize("statistic", [[], ["--best", "--cpu-time", "--threads", "1"]])
def test_comparison_reports_every_time_ratio_and_agreement(capsys, statistic):
    import numba

    spec = importlib.util.spec_from_file_location("compare_levelset_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = numba.get_num_threads()
    try:
        module.main(["--size", "32", "--repeats", "1", *statistic])
    finally:
        numba.set_num_threads(previous)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Numba threads: {1 if statistic else previous}"
    assert sum(line.endswith(" ms") for line in lines) == 10
    assert sum(line.endswith("x") for line in lines) == 5
    assert sum(line.endswith(" identical") for line in lines) == 5
