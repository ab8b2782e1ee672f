"""CPU forward of pydeform (Numba CPU) against its peer, side by side.

Times both, alternately in one process, on the CPU cases of pydeform.benchmark_cases that have a
peer and prints their medians and the ratios that ``docs/benchmarks.md`` records. ``--op`` picks
the op: deform_conv2d (N=2, C=64 -> 64, 64x64, 3x3, pad 1, with mask; ONNX Runtime DeformConv),
roi_align (256 rois on a C=64, 100x152 map, 7x7, aligned, sampling_ratio 2 and adaptive; ORT
RoiAlign), roi_pool (same rois; ORT MaxRoiPool) or centernet_decode (B=2, 80 classes, 128x128,
K=100; the PyTorch decode). Run from the repository root:

    python asv_benchmarks/compare_cpu.py --op roi_align

By default both sides share one process. A library can leave worker threads spinning for a
while after its work (ONNX Runtime's intra-op pool; OpenBLAS after a GEMM, which pydeform's CPU
backward runs), which slows whatever runs next on a small machine; ``--separate`` times each
side in its own process instead, which is what a program using only one of them sees.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

OPS = ("deform_conv2d", "roi_align", "roi_pool", "centernet_decode")
ROUNDS = 5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=OPS, default="deform_conv2d", help="the op to compare (default deform_conv2d)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"alternating rounds of timed calls of each (default {ROUNDS})")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both sides: Numba, OpenBLAS and ORT's intra-op pool (default: "
                        "each library's own default, one per core)")
    parser.add_argument("--separate", action="store_true",
                        help="time each side in its own process (neither slowed by the other's spinning threads)")
    parser.add_argument("--side", choices=("pydeform", "peer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        # Read by Numba and OpenBLAS when they load, so set before the imports below.
        for variable in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[variable] = str(args.threads)

    import pydeform
    from pydeform import _onnx_models, benchmark_cases

    _onnx_models.SESSION_THREADS = args.threads
    cases = [case for case in benchmark_cases.cases(args.op, "cpu") if case.peer]
    if args.side:
        # A child of --separate: time one side of every case, answer in JSON on stdout.
        seconds = []
        for case in cases:
            host = benchmark_cases.host_inputs(case)
            calls = (benchmark_cases.pydeform_calls(case, benchmark_cases.device_inputs(host, "float32"))
                     if args.side == "pydeform" else benchmark_cases.peer_calls(case, host, "float32"))
            seconds.append(benchmark_cases.alternating_medians([calls.forward], args.rounds)[0])
        print(json.dumps(seconds))
        return
    print(f"threads: {args.threads or 'library defaults'}")
    print(f"date: {datetime.date.today()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}")
    # Other work on the machine slows both sides; the load says how busy it was.
    print("load average (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    versions = [f"{name} {installed_version(name)}" for name in ("numpy", "numba", "onnxruntime", "torch")]
    print(f"versions: pydeform {pydeform.__version__}, {', '.join(versions)}, Python {platform.python_version()}")
    print("timing: " + ("each side in its own process" if args.separate else "both sides alternately in one process"))
    calls = benchmark_cases.BLOCK * args.rounds
    if args.separate:
        child = [sys.executable, os.path.abspath(__file__), "--op", args.op, "--rounds", str(args.rounds),
                 "--threads", str(args.threads), "--side"]
        pydeform_all, peer_all = (
            json.loads(subprocess.run(child + [side], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for side in ("pydeform", "peer")
        )
    for index, case in enumerate(cases):
        if args.separate:
            pydeform_seconds, peer_seconds = pydeform_all[index], peer_all[index]
        else:
            host = benchmark_cases.host_inputs(case)
            ours = benchmark_cases.pydeform_calls(case, benchmark_cases.device_inputs(host, "float32")).forward
            peer = benchmark_cases.peer_calls(case, host, "float32").forward
            pydeform_seconds, peer_seconds = benchmark_cases.alternating_medians([ours, peer], args.rounds)
        labels = ("pydeform (numba-cpu):", case.peer + ":", "ratio peer / pydeform:")
        width = max(map(len, labels))
        print(f"{case.op} forward, {case.workload}:")
        print(f"  {labels[0]:<{width}} {pydeform_seconds * 1e3:9.2f} ms  (median of {calls})")
        print(f"  {labels[1]:<{width}} {peer_seconds * 1e3:9.2f} ms  (median of {calls})")
        print(f"  {labels[2]:<{width}} {peer_seconds / pydeform_seconds:9.2f}     (>= 1: pydeform is faster)")
    print("load average at the end (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))


if __name__ == "__main__":
    main()
