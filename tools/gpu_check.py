"""The device check: every GPU test, a sanitizer pass and the GPU benchmark, in one report.

Run through ``tools/gpu_check.sh`` (docs/testing.md, "On a GPU"). Stages run one after the
other, each in its own process group under its own time limit, so a hang costs at most that
stage's limit: a stage that runs past it is killed, reported as timed out, and the next one
starts. The default limits add up to 7.5 minutes. After every stage the report is written
again (``gpu_check.md`` and ``gpu_check.json`` in the output folder, with ``gpu_check.log``
holding every stage's output and ``bench.json`` / ``bench.png`` from the benchmark), so a check
cut short still leaves what it found.

Only the standard library is used here; the stages run ``GPU_CHECK_PYTHON`` (default: this
interpreter) with the checkout and the wheels of ``--wheels`` (installed first, without an
index) on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Test files of each test stage; every other test file with a gpu mark goes to "tests-other".
OP_TEST_FILES = ("test_gpu_deform_conv.py", "test_gpu_roi.py", "test_gpu_centernet.py")
FRAMEWORK_TEST_FILES = ("test_gpu_torch.py", "test_gpu_jax.py")
# The sanitizer passes: a few small cases through both GPU backends (memcheck: every op family;
# racecheck: the CenterNet kernels, the only ones whose threads share memory).
MEMCHECK_SELECTION = ("test_gpu_deform_conv.py", "test_gpu_roi.py", "test_gpu_centernet.py"), (
    "(kernels_write_every_element and float32) or empty_batch")
RACECHECK_SELECTION = ("test_gpu_centernet.py",), (
    "decode_selection_paths or (kernel_sets_write_every_element and float32) or focal_loss_is_deterministic")

#: Default time limit of each stage in seconds; they add up to 450 s, under 8 minutes with the
#: wheel install and the report.
LIMITS = {
    "wheels": 20,
    "nvidia-smi": 10,
    "environment": 20,
    "info": 30,
    "tests-ops": 120,
    "tests-frameworks": 70,
    "tests-other": 35,
    "memcheck": 55,
    "racecheck": 30,
    "bench": 60,
}
#: hypothesis examples per test (tests that set their own count keep it): the check must fit
#: the lease; CI runs the full counts on the CPU twins.
TEST_EXAMPLES = 8
SANITIZER_EXAMPLES = 2

# pytest -v lines: "tests/x.py::test[a] PASSED [ 5%]", with pytest-xdist "[gw0] [ 5%] PASSED tests/x.py::test[a]".
_TEST_RESULT = re.compile(
    r"^(?:\[gw\d+\]\s+(?:\[\s*\d+%\]\s+)?(?P<outcome1>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<id1>\S+::\S+)"
    r"|(?P<id2>\S+::\S+)\s+(?P<outcome2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)")
_SANITIZER_ERRORS = re.compile(r"=+ ERROR SUMMARY: (\d+) errors?")
_RACECHECK_HAZARDS = re.compile(r"=+ RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


@dataclass
class Stage:
    name: str
    what: str  # one line for the report
    argv: list
    limit_s: float
    kind: str = "command"  # "command"; "text" (output kept); "json" (its last line, a JSON object, kept);
    # "pytest" (test outcomes counted); "sanitizer" (pytest under compute-sanitizer: also its errors)
    env: dict = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    what: str
    command: str
    limit_s: float
    status: str  # "passed", "failed", "timed out", "not run"
    returncode: Optional[int]
    wall_s: float
    tests: dict = field(default_factory=dict)  # outcome -> count
    tests_by_file: dict = field(default_factory=dict)  # file -> {outcome: count}
    failed_tests: list = field(default_factory=list)
    sanitizer_errors: Optional[int] = None
    racecheck_hazards: Optional[dict] = None
    data: Optional[dict] = None  # a "text" stage's output ({"output": ...}) or a "json" stage's object
    tail: str = ""  # the end of the output of a stage that did not pass


def count_tests(output: str) -> tuple:
    """({outcome: count}, {file: {outcome: count}}, [failed test ids]) from pytest -v output; a
    test reported twice (a failure in call and in teardown) counts by its worst outcome."""
    outcomes = {}
    for line in output.splitlines():
        match = _TEST_RESULT.match(line.strip())
        if match:
            test_id = match.group("id1") or match.group("id2")
            outcome = match.group("outcome1") or match.group("outcome2")
            if outcomes.get(test_id) not in ("FAILED", "ERROR"):
                outcomes[test_id] = outcome
    totals, by_file = {}, {}
    for test_id, outcome in outcomes.items():
        key = outcome.lower()
        totals[key] = totals.get(key, 0) + 1
        per_file = by_file.setdefault(test_id.split("::")[0], {})
        per_file[key] = per_file.get(key, 0) + 1
    failed = [test_id for test_id, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    return totals, by_file, failed


def sanitizer_counts(output: str) -> tuple:
    """(errors, racecheck hazards) from compute-sanitizer's summary lines; None where absent."""
    errors = [int(n) for n in _SANITIZER_ERRORS.findall(output)]
    hazards = _RACECHECK_HAZARDS.findall(output)
    racecheck = None
    if hazards:
        racecheck = {key: sum(int(h[i]) for h in hazards) for i, key in enumerate(("hazards", "errors", "warnings"))}
    return (sum(errors) if errors else None), racecheck


def gpu_test_files() -> list:
    """Every test file that marks a test ``gpu``."""
    return sorted(path.name for path in TESTS.glob("test_*.py") if "mark.gpu" in path.read_text())


def tests(names) -> list:
    return [f"tests/{name}" for name in names]


def stages(python: str, out: Path, limits: dict, xdist: bool) -> list:
    pytest = [python, "-m", "pytest", "-v", "-m", "gpu", "-p", "tools.gpu_check_plugin", "--tb=short",
              "-rfE", "--continue-on-collection-errors"]
    other = [name for name in gpu_test_files() if name not in OP_TEST_FILES + FRAMEWORK_TEST_FILES]
    examples = {"GPU_CHECK_EXAMPLES": str(TEST_EXAMPLES)}
    sanitized = {"GPU_CHECK_EXAMPLES": str(SANITIZER_EXAMPLES), "GPU_CHECK_NO_MEMORY_POOL": "1",
                 "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    sanitizer = ["compute-sanitizer", "--print-limit", "20", "--error-exitcode", "1"]
    memcheck_files, memcheck_k = MEMCHECK_SELECTION
    racecheck_files, racecheck_k = RACECHECK_SELECTION
    return [
        Stage("nvidia-smi", "the GPU, its driver and CUDA version",
              ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit",
               "--format=csv"], limits["nvidia-smi"], "text"),
        Stage("environment", "CuPy's device properties, the packages and pyproject's requirements",
              [python, "tools/gpu_check_env.py"], limits["environment"], "json"),
        Stage("info", "python -m pydeform info", [python, "-m", "pydeform", "info"], limits["info"], "text"),
        Stage("tests-ops", "gpu tests of deform_conv2d, the RoI ops and CenterNet (both GPU backends, "
              "torchvision)", pytest + (["-n", "4"] if xdist else []) + tests(OP_TEST_FILES),
              limits["tests-ops"], "pytest", examples),
        Stage("tests-frameworks", "gpu tests of pydeform.torch and pydeform.jax",
              pytest + tests(FRAMEWORK_TEST_FILES), limits["tests-frameworks"], "pytest", examples),
        Stage("tests-other", "the other gpu-marked tests (" + ", ".join(other) + ")",
              pytest + tests(other), limits["tests-other"], "pytest", examples),
        Stage("memcheck", "compute-sanitizer --tool memcheck over a few small cases of every op family "
              "(no memory pool: each array is its own allocation)",
              sanitizer + ["--tool", "memcheck", "--leak-check", "no"] + pytest + ["-k", memcheck_k]
              + tests(memcheck_files), limits["memcheck"], "sanitizer", sanitized),
        Stage("racecheck", "compute-sanitizer --tool racecheck over the CenterNet kernels (shared memory)",
              sanitizer + ["--tool", "racecheck"] + pytest + ["-k", racecheck_k] + tests(racecheck_files),
              limits["racecheck"], "sanitizer", sanitized),
        Stage("bench", "python -m pydeform bench --device gpu --quick (torchvision, the PyTorch decode)",
              [python, "-m", "pydeform", "bench", "--device", "gpu", "--quick",
               "--json", str(out / "bench.json"), "--png", str(out / "bench.png")], limits["bench"]),
    ]


def run_stage(stage: Stage, env: dict, log) -> StageResult:
    """Runs ``stage`` in its own process group, killed with everything it started at its limit."""
    command = shlex.join(stage.argv)
    log.write(f"\n===== {stage.name} ({stage.limit_s:g} s): {command}\n")
    log.flush()
    started = time.monotonic()
    try:
        process = subprocess.Popen(stage.argv, cwd=ROOT, env={**env, **stage.env}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as error:  # the program is not there (no nvidia-smi, no compute-sanitizer)
        log.write(f"cannot start: {error}\n")
        return StageResult(stage.name, stage.what, command, stage.limit_s, "not run", None, 0.0,
                           tail=f"cannot start: {error}")
    timed_out = False
    try:
        output, _ = process.communicate(timeout=stage.limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
        output, _ = process.communicate()
    wall = time.monotonic() - started
    text = output.decode(errors="replace")
    log.write(text)
    log.write(f"===== {stage.name}: {'timed out' if timed_out else f'exit status {process.returncode}'} "
              f"after {wall:.1f} s\n")
    log.flush()
    status = "timed out" if timed_out else ("passed" if process.returncode == 0 else "failed")
    result = StageResult(stage.name, stage.what, command, stage.limit_s, status,
                         None if timed_out else process.returncode, round(wall, 1))
    if stage.kind in ("pytest", "sanitizer"):
        result.tests, result.tests_by_file, result.failed_tests = count_tests(text)
    if stage.kind == "sanitizer":
        result.sanitizer_errors, result.racecheck_hazards = sanitizer_counts(text)
    if stage.kind == "json" and not timed_out:
        try:
            result.data = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result.status = "failed"
    if stage.kind == "text":
        result.data = {"output": text.strip()}
    if result.status != "passed":
        result.tail = "\n".join(text.strip().splitlines()[-40:])
    return result


def _kill_group(process) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def install_wheels(wheels: Path, site: Path, python: str, limit_s: float, log) -> Optional[StageResult]:
    """pip-installs every wheel in ``wheels`` into ``site`` without an index (None: no wheels)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None
    stage = Stage("wheels", "the carried wheels: " + ", ".join(w.name for w in found),
                  [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site)] + [str(w) for w in found], limit_s)
    return run_stage(stage, dict(os.environ), log)


def bench_summary(path: Path) -> Optional[dict]:
    """The benchmark's GPU measurements: one row per case, dtype, pass and backend."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = []
    peers = {}
    for m in data.get("measurements", []):
        if m["implementation"] == "peer":
            peers[(m["case"], m["dtype"], m["timed"])] = m
    for m in data.get("measurements", []):
        if m["implementation"] == "peer":
            continue
        peer = peers.get((m["case"], m["dtype"], m["timed"]))
        rows.append({"case": m["case"], "dtype": m["dtype"], "pass": m["timed"], "backend": m["implementation"],
                     "median_ms": m["median_ms"], "peer": m.get("peer"),
                     "peer_ms": None if peer is None else peer["median_ms"], "speedup": m.get("speedup"),
                     "error": m.get("error")})
    return {"rows": rows, "notes": data.get("notes", []), "versions": data.get("versions", {})}


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = ["# Device check", "", f"{report['date']}, commit {report['commit']}, "
             f"{report['total_wall_s']:.0f} s in all (limits: {report['total_limit_s']:.0f} s).", ""]
    gpu = report.get("gpu") or {}
    if gpu:
        lines += ["## GPU", ""] + [f"- {key}: {value}" for key, value in gpu.items()] + [""]
    if report.get("versions"):
        lines += ["## Versions (python -m pydeform info)", "", "```", report["versions"], "```", ""]
    if report.get("requirements"):
        unmet = {name: why for name, why in report["requirements"].items() if why != "ok"}
        lines += ["## Requirements", "", "Every requirement of pyproject.toml that the check needs is met."
                  if not unmet else "Not met: " + "; ".join(f"{n}: {w}" for n, w in unmet.items()), ""]
    lines += ["## Stages", "", "| stage | status | time (s) | limit (s) | passed | failed | errors | skipped "
              "| sanitizer errors |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in report["stages"]:
        counts = stage["tests"]
        lines.append(f"| {stage['name']} | {stage['status']} | {stage['wall_s']:.1f} | {stage['limit_s']:g} | "
                     + " | ".join(_cell(counts.get(k)) if counts else "-" for k in ("passed", "failed", "error",
                                                                                  "skipped"))
                     + f" | {_cell(stage['sanitizer_errors'])} |")
    lines.append("")
    for stage in report["stages"]:
        lines += [f"- **{stage['name']}**: {stage['what']}. `{stage['command']}`"]
    lines.append("")
    by_file = {file: counts for stage in report["stages"] if stage["name"].startswith("tests-")
               for file, counts in stage["tests_by_file"].items()}
    if by_file:
        lines += ["## Tests by file", "", "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
        lines += [f"| {file} | " + " | ".join(_cell(c.get(k)) for k in ("passed", "failed", "error", "skipped"))
                  + " |" for file, c in sorted(by_file.items())]
        lines.append("")
    failed = [(stage["name"], test) for stage in report["stages"] for test in stage["failed_tests"]]
    if failed:
        lines += ["## Failed tests", ""] + [f"- {name}: `{test}`" for name, test in failed] + [""]
    bench = report.get("bench")
    if bench:
        lines += ["## Benchmark (GPU, --quick; peer / pydeform above 1: pydeform is faster)", "",
                  "| case | dtype | pass | backend | median ms | peer | peer ms | peer / pydeform |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['dtype']} | {r['pass']} | {r['backend']} | "
                  f"{'FAILED' if r['median_ms'] is None else _cell(r['median_ms'])} | {r['peer'] or '-'} | "
                  f"{_cell(r['peer_ms'])} | {_cell(r['speedup'])} |" for r in bench["rows"]]
        lines += [""] + [f"- {note}" for note in bench["notes"]] + [""]
    for stage in report["stages"]:
        if stage["tail"]:
            lines += [f"## End of the output of {stage['name']} ({stage['status']})", "", "```", stage["tail"],
                      "```", ""]
    return "\n".join(lines)


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):  # a copy of the work tree without .git says it here
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown (no git checkout)"


def _gpu(results: dict) -> dict:
    gpu = {}
    smi = results.get("nvidia-smi")
    if smi is not None and smi.data and smi.status == "passed":
        header, *rows = [line for line in smi.data["output"].splitlines() if line.strip()]
        for index, row in enumerate(rows):
            gpu[f"nvidia-smi GPU {index}"] = ", ".join(
                f"{k.strip()}: {v.strip()}" for k, v in zip(header.split(","), row.split(",")))
    env = results.get("environment")
    if env is not None and env.data:
        for index, device in enumerate(env.data.get("devices", [])):
            gpu[f"CuPy device {index}"] = ", ".join(f"{k}: {v}" for k, v in device.items())
    return gpu


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


def _has_xdist(python: str, env: dict) -> bool:
    """Whether the stages' Python has pytest-xdist (the op tests then run on 4 workers)."""
    try:
        return subprocess.run([python, "-c", "import xdist"], env=env, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder of the report (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS", str(ROOT / ".whl")),
                        help="folder of wheels to install first, without an index (default: .whl)")
    parser.add_argument("--only", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage (repeatable)")
    args = parser.parse_args(argv)
    limits = dict(LIMITS)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds:
            parser.error(f"--limit: expected STAGE=SECONDS with STAGE one of {', '.join(limits)}, got {item!r}")
        limits[name] = float(seconds)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("GPU_CHECK_PYTHON", sys.executable)
    site = Path(os.environ.get("GPU_CHECK_SITE", "/tmp/gpu_check_site"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    started = time.monotonic()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": _commit(), "total_wall_s": 0.0, "total_limit_s": 0.0, "gpu": {}, "versions": "",
              "requirements": {}, "stages": [], "bench": None}
    results = {}

    def record(result: StageResult) -> None:
        results[result.name] = result
        report["stages"].append(vars(result))
        report["total_limit_s"] += result.limit_s
        report["total_wall_s"] = round(time.monotonic() - started, 1)
        report["gpu"] = _gpu(results)
        if result.name == "info" and result.data:
            report["versions"] = result.data["output"]
        if result.name == "environment" and result.data:
            report["requirements"] = result.data.get("requirements", {})
        if result.name == "bench":
            report["bench"] = bench_summary(out / "bench.json")
        write_report(out, report)

    selected = None if args.only is None else set(args.only.split(","))
    with open(out / "gpu_check.log", "w") as log:
        installed = install_wheels(Path(args.wheels), site, python, limits["wheels"], log)
        if installed is not None:
            record(installed)
        paths = [str(ROOT)] + ([str(site)] if installed is not None else []) + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        for stage in stages(python, out, limits, xdist=_has_xdist(python, env)):
            if selected is None or stage.name in selected:
                print(f"gpu_check: {stage.name} (limit {stage.limit_s:g} s)", file=sys.stderr, flush=True)
                record(run_stage(stage, env, log))
    print(markdown(report))
    bad = [s["name"] for s in report["stages"] if s["status"] != "passed"]
    print(f"\ngpu_check: report in {out / 'gpu_check.md'} and {out / 'gpu_check.json'}; "
          + (f"not passed: {', '.join(bad)}" if bad else "every stage passed"), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
