"""Benchmark classes every module of the suite builds on.

What is benchmarked (shapes, inputs, peers) lives in :mod:`pydeform.benchmark_cases`, shared with
``python -m pydeform bench``; this module turns it into asv benchmarks. A benchmark that cannot
run here (no GPU, a peer not installed, a dtype the op does not take) raises NotImplementedError
in its setup, which asv reports as skipped.

Base classes start with an underscore so that asv does not collect them themselves.
"""

import numpy as np

from pydeform import benchmark_cases as cases_module
from pydeform.benchmark_cases import INPUT_SETS, PeerUnavailable

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"
GPU_DTYPES = ("float32", "bfloat16")
GPU_BACKENDS = ("cupy", "numba")


def require_cupy_gpu():
    """Return cupy, or raise NotImplementedError when no GPU is usable through it."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # not installed, no driver, no device: all mean "skip"
        pass
    raise NotImplementedError("no CUDA GPU usable through CuPy")


def find_case(op, device, name):
    for case in cases_module.cases(op, device):
        if case.name == name:
            return case
    raise ValueError(f"no {device} case {name!r} of {op}")


def case_by_id(case_id):
    op, device, name = case_id.split("/")
    return find_case(op, device, name)


def implementation_call(case, seed, dtype, direction, implementation, xp=np):
    """A zero-argument call running ``implementation`` ("peer" or "pydeform-<backend>", the
    backend None for the default) on the inputs of ``seed`` in ``dtype``, forward or forward
    + backward; NotImplementedError when that cannot run here."""
    host = cases_module.host_inputs(case, seed)
    if implementation == "peer":
        try:
            calls = cases_module.peer_calls(case, host, dtype)
        except PeerUnavailable as error:
            raise NotImplementedError(str(error)) from None
    else:
        backend = implementation.removeprefix("pydeform").removeprefix("-") or None
        calls = cases_module.pydeform_calls(case, cases_module.device_inputs(host, dtype, xp), backend)
    call = calls.forward if direction == FORWARD else calls.forward_backward
    if call is None:
        raise NotImplementedError(f"{implementation} has no backward of {case.op}")
    return call


def _directions(op):
    return [FORWARD, FORWARD_BACKWARD] if cases_module.cases(op)[0].backward else [FORWARD]


def _implementations(op, device, pydeform_names):
    has_peer = any(case.peer for case in cases_module.cases(op, device))
    return list(pydeform_names) + (["peer"] if has_peer else [])


def gpu_params(op):
    """asv params of :class:`_GpuOp` for ``op``: its GPU cases, dtypes, directions, implementations."""
    names = [case.name for case in cases_module.cases(op, "gpu")]
    implementations = _implementations(op, "gpu", [f"pydeform-{backend}" for backend in GPU_BACKENDS])
    return names, list(GPU_DTYPES), _directions(op), implementations


def cpu_params(op):
    """asv params of :class:`_CpuOp` for ``op``: its CPU cases, directions, implementations."""
    return [case.name for case in cases_module.cases(op, "cpu")], _directions(op), _implementations(op, "cpu", ["pydeform"])


class _GpuOp:
    """One op on the GPU beside its peer: device times (median of CUDA-event times after
    warm-up, cycling through INPUT_SETS input sets) and the peak extra device memory of a call.
    Subclasses set ``op`` and ``params = gpu_params(op)``."""

    op = None
    param_names = ("case", "dtype", "direction", "implementation")
    timeout = 900

    def setup(self, name, dtype, direction, implementation):
        self.cupy = require_cupy_gpu()
        self.case = find_case(self.op, "gpu", name)
        if dtype not in self.case.dtypes:
            raise NotImplementedError(f"{self.op} takes no {dtype} inputs")
        self.calls = [implementation_call(self.case, seed, dtype, direction, implementation, self.cupy)
                      for seed in range(INPUT_SETS)]
        self.on_torch = implementation == "peer"
        self.repeats = 50 if direction == FORWARD else 20

    def median_ms(self):
        return cases_module.cuda_median_ms(self.cupy, lambda index: self.calls[index % INPUT_SETS](),
                                           repeats=self.repeats)

    def track_ms(self, *params):
        return self.median_ms()

    def track_peak_extra_memory_mib(self, *params):
        if self.on_torch:
            import torch

            return cases_module.torch_peak_extra_mib(torch, self.calls[0])
        return cases_module.cupy_peak_extra_mib(self.cupy, self.calls[0])

    track_ms.unit = "ms"
    track_peak_extra_memory_mib.unit = "MiB"


class _CpuOp:
    """One op on the CPU (float32) beside its peer, wall time as asv measures it. Subclasses
    set ``op`` and ``params = cpu_params(op)``."""

    op = None
    param_names = ("case", "direction", "implementation")
    timeout = 300

    def setup(self, name, direction, implementation):
        case = find_case(self.op, "cpu", name)
        self.call = implementation_call(case, 0, "float32", direction, implementation)
        self.call()  # JIT compilation and session set-up, outside the timings

    def time_call(self, *params):
        self.call()
