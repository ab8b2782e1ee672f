"""The semi-convolutional CPU comparison of docs/benchmarks.md runs, agrees with the PyTorch
peer and reports the median and best times of the sides, the memory and both ratios (tiny
shapes)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "asv_benchmarks" / "compare_semiconv_cpu.py"


def test_comparison_reports_times_memory_and_ratio(capsys):
    spec = importlib.util.spec_from_file_location("compare_semiconv_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--batch", "2", "--dims", "3", "--size", "9", "--instances", "4", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and sum(": median " in line and line.endswith(" ms") for line in lines) == 3
    assert lines[3].startswith("allocated besides the gradient")
    assert lines[4].startswith("torch / pydeform.torch: median ") and ", best " in lines[4] and lines[4].endswith("x")
