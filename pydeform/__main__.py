"""Command line: ``python -m pydeform {info,selftest,bench,demo,warmup}`` (also installed as ``pydeform``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata


def _cuda_lines() -> list[str]:
    """CUDA driver and runtime versions and the GPUs, as CuPy sees them."""
    try:
        import cupy
    except Exception as error:  # not installed, or built for another CUDA version
        return [f"CUDA: not queried (CuPy not importable: {error})", "GPUs: no GPU"]

    def version(query) -> str:
        try:
            number = query()
        except cupy.cuda.runtime.CUDARuntimeError as error:
            return f"unavailable ({error})"
        return f"{number // 1000}.{number % 1000 // 10}" if number else "none"

    runtime = cupy.cuda.runtime
    lines = [
        f"CUDA driver: {version(runtime.driverGetVersion)}",
        f"CUDA runtime: {version(runtime.runtimeGetVersion)}",
    ]
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError:
        count = 0
    if count == 0:
        return lines + ["GPUs: no GPU"]
    for index in range(count):
        properties = runtime.getDeviceProperties(index)
        name = properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"]
        memory = properties["totalGlobalMem"] / 2**30
        lines.append(f"GPU {index}: {name}, {memory:.0f} GiB, compute capability "
                     f"{properties['major']}.{properties['minor']}")
    return lines


def _cache_lines() -> list[str]:
    """Where compiled kernels are kept between processes."""
    from .backends.compile_notice import cupy_cache_folder, numba_cache_folder

    cupy_folder = cupy_cache_folder() or "none, in memory only (CUPY_CACHE_IN_MEMORY is set)"
    return [f"Numba kernel cache: {numba_cache_folder()}", f"CuPy kernel cache: {cupy_folder}"]


def info() -> int:
    """Print versions, the CUDA set-up and which backends are usable here."""
    from . import __version__
    from ._bench import installed_version
    from .selftest import discover_backends

    print(f"pydeform: {__version__}")
    print(f"Python: {platform.python_version()} ({sys.executable})")
    for distribution in ("numpy", "numba", "numba-cuda", "ml_dtypes"):
        print(f"{distribution}: {installed_version(distribution)}")
    cupy_distributions = [d.metadata["Name"] for d in metadata.distributions()
                          if (d.metadata["Name"] or "").lower().startswith("cupy")]
    print(f"CuPy: {', '.join(f'{d} {installed_version(d)}' for d in cupy_distributions) or 'not installed'}")
    for line in _cuda_lines() + _cache_lines():
        print(line)
    backends, skipped = discover_backends()
    for backend in backends:
        print(f"backend {backend.name}: usable ({', '.join(backend.dtypes)})")
    for name, reason in skipped.items():
        print(f"backend {name}: not usable: {reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pydeform",
        description="pydeform: deformable and RoI vision ops on CuPy (GPU) and NumPy (CPU) arrays.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    selftest = commands.add_parser(
        "selftest",
        help="check every op on every backend usable here and print a table",
        description=(
            "Run every op on every backend usable on this machine (numba-cpu always; cupy and "
            "numba-cuda with a GPU) in each dtype the backend supports, and check it without the "
            "test suite: against a float64 run, between backends, gradients against finite "
            "differences, and identities with answers computed directly in NumPy (deform_conv2d: "
            "zero offsets with a unit mask against an ordinary convolution, no mask against a mask "
            "of ones; RoI ops: affine, ramp and channel-constant images, deform_roi_pool's "
            "zero-offset and mask identities). Exit status 1 if any check fails."
        ),
    )
    selftest.add_argument("--quick", action="store_true", help="run one small case per check instead of all")
    commands.add_parser(
        "info",
        help="print versions, CUDA driver/runtime, GPUs, kernel cache folders and which backends are usable",
        description="Print the versions of pydeform and its dependencies, the CUDA driver and "
        "runtime and the GPUs CuPy finds, where compiled kernels are cached on disk, and which "
        "backends are usable here (and why not).",
    )
    from .benchmark_cases import OPS

    bench = commands.add_parser(
        "bench",
        help="time every op on every backend here beside torchvision / ONNX Runtime / the PyTorch decode",
        description=(
            "Time every op at the standard shapes of pydeform.benchmark_cases (docs/benchmarks.md) on every "
            "backend usable here, beside the installed peers: torchvision on the GPU, ONNX Runtime "
            "on the CPU, the PyTorch CenterNet decode on both. CPU: wall-clock medians, pydeform and "
            "the peer timed in alternating blocks; GPU: CUDA-event medians after warm-up. Prints a "
            "table of medians and of peer / pydeform ratios (above 1: pydeform is faster), with a "
            "progress bar on stderr. No median includes compilation: untimed calls come first. Exit "
            "status 1 if a pydeform measurement failed."
        ),
    )
    bench.add_argument("--op", choices=OPS, help="time this op only (default: every op)")
    bench.add_argument("--device", choices=("cpu", "gpu"), help="time the cases of this device only")
    bench.add_argument("--quick", action="store_true",
                       help="one case per op and device, and fewer repetitions")
    bench.add_argument("--rounds", type=int, metavar="N",
                       help="alternating rounds (CPU) or CUDA-event repeats (GPU) per median "
                       "(default 5 / 50, with --quick 2 / 10)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--png", metavar="PATH", help="also draw the medians as a bar chart PNG to PATH")
    demo = commands.add_parser(
        "demo",
        help="draw CenterNet detections, deformable sampling points and a RoI Align grid of a synthetic scene",
        description=(
            "Decode CenterNet detections from a synthetic scene and draw, in one PNG, the image "
            "with its detections, a deformable convolution's sampling points at a few pixels and "
            "RoI Align's bins and sampling points in one detected box (runs on the CPU)."
        ),
    )
    demo.add_argument("--out", metavar="PATH", default="pydeform_demo.png",
                      help="where to write the PNG (default: pydeform_demo.png)")
    from ._arrays import _GPU_DTYPES

    warmup = commands.add_parser(
        "warmup",
        help="compile the kernels ahead of their first use (for container images and CI)",
        description=(
            "Compile every kernel of the chosen ops, forward and backward, for every backend usable "
            "here (numba-cpu always; cupy and numba-cuda with a GPU) in every dtype each supports, "
            "by running each op once on tiny inputs, with a progress bar on stderr; then print what "
            "was compiled and how long it took. Compiled kernels go to the Numba and CuPy disk "
            "caches (see `info`), from which later processes load them; kernels already there are "
            "loaded, not compiled again."
        ),
    )
    warmup.add_argument("--op", choices=OPS, action="append",
                        help="compile this op's kernels (repeat for several; default: every op)")
    warmup.add_argument("--device", choices=("cpu", "gpu"), help="compile for this device's backends only")
    warmup.add_argument("--dtype", choices=_GPU_DTYPES, action="append",
                        help="compile for this dtype only (repeat for several; default: every dtype "
                        "a backend supports: float32 and float64 on the CPU, also float16 and bfloat16 on the GPU)")
    args = parser.parse_args(argv)
    # Output folders are checked before minutes of timing, not after.
    for option in ("json", "png", "out"):
        path = getattr(args, option, None)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"--{option}: the folder of {path} does not exist")
    if args.command == "info":
        return info()
    if args.command == "bench":
        from . import _bench

        if args.rounds is not None and args.rounds < 1:
            parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
        return _bench.main(args.op, args.device, args.quick, args.rounds, args.json, args.png,
                           sys.argv[1:] if argv is None else list(argv))
    if args.command == "warmup":
        from . import _warmup

        return _warmup.main(args.op, args.device, args.dtype)
    if args.command == "demo":
        from . import _demo

        return _demo.main(args.out)
    from .selftest import run_selftest

    return run_selftest(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
