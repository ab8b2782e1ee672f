"""The device check (tools/gpu_check.sh, tools/gpu_check.py) dry-run on a fake GPU machine.

``nvidia-smi``, ``compute-sanitizer`` and the stages' Python are stand-ins on PATH (the Python
through ``GPU_CHECK_PYTHON``): the fake pytest prints pytest -v lines (xdist's format where
``-n`` is given) and one test file hangs, the fake sanitizer runs its program and prints a
summary, the fake benchmark writes bench.json. The check must report every stage with its
counts, kill the hanging stage at its limit and go on, install the carried wheels without an
index and write the Markdown and JSON report.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tools import gpu_check

FAKE_PYTHON = """\
#!{python}
import json, os, subprocess, sys, time
args = sys.argv[1:]
if args[:1] == ["-c"]:
    sys.exit(0 if args[1] == "import xdist" else 1)
if args[:1] == ["tools/gpu_check_env.py"]:
    try:
        import gpu_check_probe  # installed from the carried wheel
        probe = gpu_check_probe.VERSION
    except ImportError:
        probe = None
    print("some start-up chatter")
    print(json.dumps({{"python": "3.12.3", "devices": [{{"name": "Fake H100", "compute capability": "9.0"}}],
                      "packages": {{"gpu-check-probe": probe}},
                      "requirements": {{"numpy": "ok", "numba-cuda": "0.19 does not meet >=0.20"}}}}))
    sys.exit(0)
if args[:3] == ["-m", "pydeform", "info"]:
    print("pydeform: 0.1.0")
    print("GPU 0: Fake H100, 80 GiB, compute capability 9.0")
    sys.exit(0)
if args[:3] == ["-m", "pydeform", "bench"]:
    json_path = args[args.index("--json") + 1]
    open(args[args.index("--png") + 1], "wb").write(b"\\x89PNG fake")
    measurement = dict(case="roi_align/gpu/7x7", op="roi_align", device="gpu", workload="w", dtype="float32",
                       timed="forward", peer="torchvision.ops.roi_align", error=None)
    json.dump({{"measurements": [dict(measurement, implementation="cupy", median_ms=0.5, speedup=2.0),
                                 dict(measurement, implementation="peer", median_ms=1.0, speedup=None)],
               "notes": ["a note"], "versions": {{}}}}, open(json_path, "w"))
    sys.exit(0)
if args[:2] == ["-m", "pytest"]:
    files = [a for a in args if a.startswith("tests/")]
    if os.environ["FAKE_HANG"] in files:
        print("tests/hang.py::test_starts PASSED", flush=True)
        subprocess.run(["sleep", "60"])  # a child process: the whole group must be killed
        sys.exit(0)
    failed = False
    for index, name in enumerate(files):
        for test, outcome in (("test_a[float32]", "PASSED"), ("test_b", "FAILED" if "roi" in name and "-k" not in args else "PASSED"),
                              ("test_c", "SKIPPED")):
            failed |= outcome == "FAILED"
            if "-n" in args:
                print(f"[gw{{index}}] [ 50%] {{outcome}} {{name}}::{{test}}")
            else:
                print(f"{{name}}::{{test}} {{outcome}}    [ 50%]")
    sys.exit(1 if failed else 0)
os.execv(sys.executable, [sys.executable] + args)  # pip and anything else: the real Python
"""

FAKE_NVIDIA_SMI = """\
#!{python}
print("name, driver_version, memory.total [MiB], compute_cap")
print("Fake H100, 580.1, 81559 MiB, 9.0")
"""

FAKE_SANITIZER = """\
#!{python}
import os, subprocess, sys
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
program = args[args.index(os.environ["GPU_CHECK_PYTHON"]):]
code = subprocess.run(program).returncode
errors = 3 if tool == "racecheck" else 0
if tool == "racecheck":
    print("========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)")
print(f"========= ERROR SUMMARY: {{errors}} error{{'' if errors == 1 else 's'}}")
sys.exit(1 if errors or code else 0)
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, as `pip download` would leave one in .whl/."""
    folder.mkdir()
    wheel = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    info = "gpu_check_probe-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpu_check_probe.py", "VERSION = '1.0'\n")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One run of tools/gpu_check.sh on the fake machine, tests-frameworks hanging (limit 2 s)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake_python = _executable(bin_dir / "fake-python", FAKE_PYTHON)
    _executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    _executable(bin_dir / "compute-sanitizer", FAKE_SANITIZER)
    out = tmp / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GPU_CHECK_PYTHON=str(fake_python),
               GPU_CHECK_SITE=str(tmp / "site"), GPU_CHECK_COMMIT="abc1234", FAKE_HANG="tests/test_gpu_torch.py")
    env.pop("OUT", None)
    # python3 on PATH must be this interpreter's (the driver is stdlib only, but be exact).
    (bin_dir / "python3").symlink_to(sys.executable)
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--out", str(out),
                             "--wheels", str(_probe_wheel(tmp / "wheels")), "--limit", "tests-frameworks=2"],
                            env=env, capture_output=True, text=True, timeout=120)
    return result, out, time.monotonic() - started


def _stages(out: Path) -> dict:
    return {stage["name"]: stage for stage in json.loads((out / "gpu_check.json").read_text())["stages"]}


def test_every_stage_runs_in_order_and_the_hang_is_cut_at_its_limit(dry_run):
    result, out, seconds = dry_run
    assert result.returncode == 1, result.stderr  # a failed test and the timeout fail the check
    stages = _stages(out)
    assert list(stages) == ["wheels", "nvidia-smi", "environment", "info", "tests-ops", "tests-frameworks",
                            "tests-other", "memcheck", "racecheck", "bench"]
    hung = stages["tests-frameworks"]
    assert hung["status"] == "timed out" and hung["returncode"] is None and 2 <= hung["wall_s"] < 10
    assert hung["tests"] == {"passed": 1}  # what it printed before the limit still counts
    assert seconds < 30  # the sleeping child was killed with its parent, not waited for
    for name in ("wheels", "nvidia-smi", "environment", "info", "tests-other", "memcheck", "bench"):
        assert stages[name]["status"] == "passed", stages[name]
    assert stages["tests-ops"]["status"] == "failed" and stages["racecheck"]["status"] == "failed"


def test_counts_per_stage_and_file_and_sanitizer_errors(dry_run):
    _, out, _ = dry_run
    stages = _stages(out)
    ops = stages["tests-ops"]
    assert "-n 4" in ops["command"]  # xdist was found: its output format is counted too
    assert ops["tests"] == {"passed": 5, "failed": 1, "skipped": 3}
    assert ops["tests_by_file"]["tests/test_gpu_roi.py"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert ops["failed_tests"] == ["tests/test_gpu_roi.py::test_b"]
    other = stages["tests-other"]
    assert set(other["tests_by_file"]) == {f"tests/{name}" for name in gpu_check.gpu_test_files()
                                           if name not in gpu_check.OP_TEST_FILES + gpu_check.FRAMEWORK_TEST_FILES}
    assert stages["memcheck"]["sanitizer_errors"] == 0 and stages["memcheck"]["command"].startswith(
        "compute-sanitizer --print-limit 20 --error-exitcode 1 --tool memcheck")
    assert stages["racecheck"]["sanitizer_errors"] == 3
    assert stages["racecheck"]["racecheck_hazards"] == {"hazards": 3, "errors": 3, "warnings": 0}


def test_report_has_the_gpu_versions_requirements_and_benchmark(dry_run):
    _, out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["commit"] == "abc1234"
    assert report["gpu"]["nvidia-smi GPU 0"].startswith("name: Fake H100, driver_version: 580.1")
    assert report["gpu"]["CuPy device 0"] == "name: Fake H100, compute capability: 9.0"
    assert report["versions"].startswith("pydeform: 0.1.0")
    assert report["requirements"]["numba-cuda"] == "0.19 does not meet >=0.20"
    environment = _stages(out)["environment"]["data"]
    assert environment["packages"]["gpu-check-probe"] == "1.0"  # the carried wheel is importable
    assert report["bench"]["rows"] == [{"case": "roi_align/gpu/7x7", "dtype": "float32", "pass": "forward",
                                        "backend": "cupy", "median_ms": 0.5, "peer": "torchvision.ops.roi_align",
                                        "peer_ms": 1.0, "speedup": 2.0, "error": None}]
    assert (out / "bench.png").is_file() and (out / "gpu_check.log").is_file()
    assert report["total_limit_s"] == sum(gpu_check.LIMITS.values()) - gpu_check.LIMITS["tests-frameworks"] + 2
    # Few files: the device returns at most 8 from $OUT.
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.png", "gpu_check.json", "gpu_check.log",
                                                     "gpu_check.md"]


def test_markdown_report(dry_run):
    result, out, _ = dry_run
    text = (out / "gpu_check.md").read_text()
    assert text == result.stdout.rstrip("\n") or text in result.stdout  # printed last as well
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.splitlines() if re.match(r"\| [a-z-]+ \| (passed|failed|timed out|not run) \|", line)}
    assert rows["tests-ops"][0] == "failed" and rows["tests-ops"][3:7] == ["5", "1", "-", "3"]
    assert rows["tests-frameworks"][0] == "timed out" and rows["tests-frameworks"][2] == "2"
    assert rows["racecheck"][-1] == "3" and rows["memcheck"][-1] == "0"
    assert "| roi_align/gpu/7x7 | float32 | forward | cupy | 0.500 | torchvision.ops.roi_align | 1.000 | 2.000 |" in text
    assert "- tests-ops: `tests/test_gpu_roi.py::test_b`" in text
    assert "## End of the output of tests-frameworks (timed out)" in text
    assert "Not met: numba-cuda: 0.19 does not meet >=0.20" in text


def test_default_limits_fit_eight_minutes_and_the_selections_exist():
    assert sum(gpu_check.LIMITS.values()) <= 450
    stages = gpu_check.stages("python", Path("/tmp/out"), gpu_check.LIMITS, xdist=False)
    assert {s.name for s in stages} | {"wheels"} == set(gpu_check.LIMITS)
    tested = {arg.removeprefix("tests/") for s in stages if s.name.startswith("tests-") for arg in s.argv
              if arg.startswith("tests/")}
    assert tested == set(gpu_check.gpu_test_files()) and set(gpu_check.OP_TEST_FILES) <= tested
    # Every test name the sanitizer selections name is a test function of their files.
    for files, expression in (gpu_check.MEMCHECK_SELECTION, gpu_check.RACECHECK_SELECTION):
        source = "".join((ROOT / "tests" / name).read_text() for name in files)
        for word in set(re.findall(r"[a-z_0-9]+", expression)) - {"and", "or", "not", "float32"}:
            assert re.search(rf"def test_\w*{word}", source), word


def test_count_tests_reads_both_output_formats():
    output = textwrap.dedent("""\
        tests/a.py::test_x[1] PASSED                     [ 10%]
        tests/a.py::test_y FAILED                        [ 20%]
        tests/a.py::test_y ERROR                         [ 20%]
        [gw1] [ 30%] SKIPPED tests/b.py::test_z
        [gw0] PASSED tests/b.py::test_w
        FAILED tests/a.py::test_y - AssertionError
        """)
    totals, by_file, failed = gpu_check.count_tests(output)
    assert totals == {"passed": 2, "failed": 1, "skipped": 1}
    assert by_file == {"tests/a.py": {"passed": 1, "failed": 1}, "tests/b.py": {"skipped": 1, "passed": 1}}
    assert failed == ["tests/a.py::test_y"]


def test_plugin_sets_the_example_count_and_turns_cupy_s_pool_off(tmp_path):
    """tools/gpu_check_plugin.py wins over tests/conftest.py's profile, and with
    GPU_CHECK_NO_MEMORY_POOL=1 CuPy allocates each array by itself (what memcheck needs)."""
    pytest.importorskip("cupy")
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent("""\
        import cupy
        from hypothesis import settings

        def test_settings():
            assert settings().max_examples == 3 and settings().derandomize
            assert cupy.cuda.get_allocator().__name__ == "_malloc"
        """))
    env = dict(os.environ, GPU_CHECK_EXAMPLES="3", GPU_CHECK_NO_MEMORY_POOL="1", PYTHONPATH=str(ROOT))
    # tests/conftest.py (loaded as a plugin here, since the probe lies outside tests/) loads its
    # own profile on import; the check's plugin must still be the one in force.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "tools.gpu_check_plugin",
                             str(probe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
