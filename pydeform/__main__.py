"""Command line: ``python -m pydeform {selftest,info}`` (also installed as ``pydeform``)."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


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


def info() -> int:
    """Print versions, the CUDA set-up and which backends are usable here."""
    from . import __version__
    from .selftest import discover_backends

    print(f"pydeform: {__version__}")
    print(f"Python: {platform.python_version()} ({sys.executable})")
    for distribution in ("numpy", "numba", "numba-cuda", "ml_dtypes"):
        print(f"{distribution}: {_version(distribution)}")
    cupy_distributions = [d.metadata["Name"] for d in metadata.distributions()
                          if (d.metadata["Name"] or "").lower().startswith("cupy")]
    print(f"CuPy: {', '.join(f'{d} {_version(d)}' for d in cupy_distributions) or 'not installed'}")
    for line in _cuda_lines():
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
        help="print versions, CUDA driver/runtime, GPUs and which backends are usable",
        description="Print the versions of pydeform and its dependencies, the CUDA driver and "
        "runtime and the GPUs CuPy finds, and which backends are usable here (and why not).",
    )
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    from .selftest import run_selftest

    return run_selftest(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
