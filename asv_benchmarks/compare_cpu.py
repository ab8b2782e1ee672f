"""CPU forward of pydeform (Numba CPU) against ONNX Runtime, side by side.

Times both, alternately in one process, on the CPU standard shapes of PERF.md and prints their
medians and the ratios that ``docs/benchmarks.md`` records. ``--op`` picks the op:
deform_conv2d (N=2, C=64 -> 64, 64x64, 3x3, pad 1, with mask; ORT DeformConv), roi_align
(256 rois on a C=64, 100x152 map, 7x7, aligned, sampling_ratio 2 and adaptive; ORT RoiAlign)
or roi_pool (same rois; ORT MaxRoiPool). Run from the repository root:

    python asv_benchmarks/compare_cpu.py --op roi_align
"""

import argparse
import datetime
import os
import platform
from importlib import metadata

OPS = ("deform_conv2d", "roi_align", "roi_pool")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=OPS, default="deform_conv2d", help="the op to compare (default deform_conv2d)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"alternating rounds of timed calls of each (default {ROUNDS})")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both sides: Numba, OpenBLAS and ORT's intra-op pool (default: "
                        "each library's own default, one per core)")
    args = parser.parse_args()
    if args.threads:
        # Read by Numba and OpenBLAS when they load, so set before the imports below.
        for variable in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[variable] = str(args.threads)

    import pydeform
    from benchmarks import deform_conv, roi
    from benchmarks.timing import BLOCK, require_onnx_models

    require_onnx_models().SESSION_THREADS = args.threads
    module, comparisons = {
        "deform_conv2d": (deform_conv, deform_conv.cpu_comparisons),
        "roi_align": (roi, roi.roi_align_comparisons),
        "roi_pool": (roi, roi.roi_pool_comparisons),
    }[args.op]
    print(f"threads: {args.threads or 'library defaults'}")
    print(f"date: {datetime.date.today()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}")
    # Other work on the machine slows both sides; the load says how busy it was.
    print("load average (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    versions = [f"{name} {metadata.version(name)}" for name in ("numpy", "numba", "onnxruntime")]
    print(f"versions: pydeform {pydeform.__version__}, {', '.join(versions)}, Python {platform.python_version()}")
    print(f"shape: {module.CPU_WORKLOAD}")
    calls = BLOCK * args.rounds
    for comparison in comparisons():
        pydeform_seconds, peer_seconds = comparison.medians(args.rounds)
        print(f"{comparison.label}:")
        print(f"  pydeform (numba-cpu): {pydeform_seconds * 1e3:9.2f} ms  (median of {calls})")
        print(f"  {comparison.peer_name + ':':<21} {peer_seconds * 1e3:9.2f} ms  (median of {calls})")
        print(f"  ratio peer / pydeform: {peer_seconds / pydeform_seconds:8.2f}  (>= 1: pydeform is faster)")
    print("load average at the end (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))


if __name__ == "__main__":
    main()
