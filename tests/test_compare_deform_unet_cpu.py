"""The CPU comparison script of docs/benchmarks.md runs and reports every time and ratio (tiny shapes)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "asv_benchmarks" / "compare_deform_unet_cpu.py"


def test_comparison_reports_every_time_and_ratio(capsys):
    spec = importlib.util.spec_from_file_location("compare_deform_unet_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--size", "4", "--channels", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and sum(line.endswith(" ms") for line in lines) == 5
    assert sum(line.endswith("x") for line in lines) == 3
