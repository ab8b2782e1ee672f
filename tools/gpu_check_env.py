"""The device check's environment stage (tools/gpu_check.py): prints one JSON object with the
GPUs as CuPy sees them, the versions of the packages the check uses, and whether each
requirement of pyproject.toml (dependencies and the test extra) is met here."""

import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Distributions the GPU tests and the benchmark import beyond pyproject's dependencies.
CHECK_PACKAGES = ("cupy-cuda12x", "cupy-cuda13x", "torch", "torchvision", "jax", "jaxlib", "jax-cuda12-plugin",
                  "jax-cuda13-plugin", "pytest", "pytest-xdist", "hypothesis", "matplotlib", "onnxruntime")
# pyproject requirements the GPU check does not need (CPU-only compile checks, asv, the docs).
NOT_NEEDED_HERE = {"cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-nvcc-cu12",
                   "asv", "sphinx", "myst-parser", "onnx", "torch"}


def version(distribution: str):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def requirement_status(requirement: str) -> tuple:
    """(name, "ok" or why not) for one PEP 508 requirement string."""
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    found = version(name)
    if found is None:
        return name, "not installed"
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # no packaging: presence is all that can be checked
        return name, "ok"
    specifier = Requirement(requirement).specifier
    return name, "ok" if specifier.contains(Version(found), prereleases=True) else f"{found} does not meet {specifier}"


def devices() -> list:
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no CuPy, no driver
        return [{"error": f"{type(error).__name__}: {error}"}]
    found = []
    for index in range(count):
        p = cupy.cuda.runtime.getDeviceProperties(index)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        found.append({"name": name, "compute capability": f"{p['major']}.{p['minor']}",
                      "multiprocessors": p["multiProcessorCount"], "memory GiB": round(p["totalGlobalMem"] / 2**30, 1),
                      "L2 MiB": round(p["l2CacheSize"] / 2**20, 1), "clock MHz": p["clockRate"] // 1000})
    return found


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = dict(requirement_status(r) for r in project["dependencies"])
    for requirement in project["optional-dependencies"]["test"]:
        name, status = requirement_status(requirement)
        if name not in NOT_NEEDED_HERE:
            requirements[name] = status
    packages = {name: version(name) for name in CHECK_PACKAGES if version(name) is not None}
    print(json.dumps({"python": sys.version.split()[0], "devices": devices(), "packages": packages,
                      "requirements": requirements}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
