"""Compiling CUDA C with NVRTC directly, and assembling its PTX with ptxas, without a GPU.

CuPy's own compile path asks the driver for the device's architecture, so it cannot run on a
machine without a GPU; NVRTC itself only needs libnvrtc and CUDA's headers, both shipped as
wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12), and ptxas comes with
nvidia-cuda-nvcc-cu12.
"""

import ctypes
import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple


class NvrtcError(RuntimeError):
    """A failed compilation; the message carries NVRTC's log."""


class NvrtcResult(NamedTuple):
    ptx: str
    log: str
    lowered_names: dict  # name expression -> mangled entry name


def _wheel_dir(module_name):
    import importlib

    module = importlib.import_module(module_name)
    return Path(next(iter(module.__path__)))


@functools.lru_cache(maxsize=None)
def cuda_include_dir():
    """The runtime wheel's include folder (cuda_fp16.h, cuda_bf16.h, ...)."""
    return _wheel_dir("nvidia.cuda_runtime") / "include"


@functools.lru_cache(maxsize=None)
def _nvrtc():
    # cupy_backends binds NVRTC lazily by soname; loading the wheel's copy globally first makes
    # that lookup succeed without LD_LIBRARY_PATH.
    library_dir = _wheel_dir("nvidia.cuda_nvrtc") / "lib"
    library = sorted(library_dir.glob("libnvrtc.so.*"))[0]
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def available():
    """Whether NVRTC and CUDA's headers can be found (the test extras installed)."""
    try:
        _nvrtc()
        return (cuda_include_dir() / "cuda_fp16.h").is_file()
    except (ImportError, OSError, StopIteration, IndexError):
        return False


def nvrtc_version():
    return _nvrtc().getVersion()


@functools.lru_cache(maxsize=None)
def supported_archs():
    """The ``compute_<arch>`` numbers this NVRTC compiles for (nvrtcGetSupportedArchs)."""
    return tuple(int(arch) for arch in _nvrtc().getSupportedArchs())


_ARCH = re.compile(r"^\d+$")


def compile_source(source, name, arch, name_expressions=(), options=()):
    """Compiles ``source`` for ``compute_<arch>`` and returns its PTX, log and lowered names.

    ``name_expressions`` (e.g. ``"kernel<float>"``) instantiate templates and are looked up in
    the result. Raises NvrtcError with the log when the compilation fails.
    """
    if not _ARCH.match(str(arch)):
        raise ValueError(f"arch must be digits like '80'; received {arch!r}")
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(source, name, [], [])
    try:
        for expression in name_expressions:
            nvrtc.addNameExpression(program, expression)
        all_options = [f"-arch=compute_{arch}", f"-I{cuda_include_dir()}", *options]
        try:
            nvrtc.compileProgram(program, all_options)
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            raise NvrtcError(f"{name} for compute_{arch} failed ({error}):\n{log}") from None
        return NvrtcResult(
            ptx=nvrtc.getPTX(program).decode().rstrip("\0"),
            log=nvrtc.getProgramLog(program),
            lowered_names={e: nvrtc.getLoweredName(program, e) for e in name_expressions},
        )
    finally:
        nvrtc.destroyProgram(program)


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\((.*?)\)", re.DOTALL)
_PARAM = re.compile(r"\.param\s+\.[a-z](\d+)")


def entry_parameter_sizes(ptx):
    """Mangled entry name -> byte size of each kernel parameter, read from the PTX."""
    return {
        name: [int(bits) // 8 for bits in _PARAM.findall(params)]
        for name, params in _ENTRY.findall(ptx)
    }


class KernelResources(NamedTuple):
    registers: int
    stack_frame_bytes: int
    spill_bytes: int  # stores plus loads


def ptxas_path():
    """ptxas of the nvidia-cuda-nvcc wheel, or None when that wheel is not installed."""
    try:
        candidate = _wheel_dir("nvidia.cuda_nvcc") / "bin" / "ptxas"
    except ImportError:
        return None
    return candidate if candidate.is_file() else None


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def kernel_resources(ptx, arch):
    """Mangled entry name -> KernelResources, from ``ptxas -v`` assembling ``ptx`` for sm_<arch>."""
    with tempfile.TemporaryDirectory() as directory:
        ptx_path = Path(directory) / "kernels.ptx"
        ptx_path.write_text(ptx)
        result = subprocess.run(
            [str(ptxas_path()), f"-arch=sm_{arch}", "-v", str(ptx_path), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )
    resources, entry, frame = {}, None, None
    for line in (result.stdout + result.stderr).splitlines():
        if match := _PTXAS_ENTRY.search(line):
            entry = match.group(1)
        elif match := _PTXAS_FRAME.search(line):
            frame = [int(g) for g in match.groups()]
        elif match := _PTXAS_REGISTERS.search(line):
            resources[entry] = KernelResources(int(match.group(1)), frame[0], frame[1] + frame[2])
    return resources
