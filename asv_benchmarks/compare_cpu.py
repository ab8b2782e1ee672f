"""CPU forward of pydeform (Numba CPU) against ONNX Runtime's DeformConv, side by side.

Times both, alternately in one process, on the CPU standard shape of PERF.md (N=2, C=64 -> 64,
64x64, 3x3, pad 1, float32, with mask) and prints their medians and the ratio that
``docs/benchmarks.md`` records. Run from the repository root:

    python asv_benchmarks/compare_cpu.py
"""

import argparse
import datetime
import os
import platform
from importlib import metadata

import pydeform
from benchmarks.deform_conv import CPU_SHAPE, cpu_forward_medians
from benchmarks.timing import BLOCK


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5,
                        help=f"alternating rounds of {BLOCK} timed calls of each (default 5)")
    args = parser.parse_args()
    print(f"date: {datetime.date.today()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}")
    # Other work on the machine slows both sides; the load says how busy it was.
    print("load average (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    versions = [f"{name} {metadata.version(name)}" for name in ("numpy", "numba", "onnxruntime")]
    print(f"versions: pydeform {pydeform.__version__}, {', '.join(versions)}, Python {platform.python_version()}")
    n, channels, height, width = CPU_SHAPE
    print(f"shape: N={n}, C={channels} -> {channels}, {height}x{width}, 3x3, pad 1, float32, with mask")
    pydeform_seconds, onnxruntime_seconds = cpu_forward_medians(args.rounds)
    print(f"pydeform (numba-cpu) forward:   {pydeform_seconds * 1e3:8.2f} ms  (median of {BLOCK * args.rounds})")
    print(f"onnxruntime DeformConv forward: {onnxruntime_seconds * 1e3:8.2f} ms  (median of {BLOCK * args.rounds})")
    print(f"ratio onnxruntime / pydeform:   {onnxruntime_seconds / pydeform_seconds:8.2f}  (>= 1: pydeform is faster)")


if __name__ == "__main__":
    main()
