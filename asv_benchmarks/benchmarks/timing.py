"""Timing helpers and peers shared by the benchmark modules and ``compare_cpu.py``.

asv times ``time_*`` methods itself; these helpers serve the ``track_*`` methods, which report a
number measured inside one process: a speed ratio against a peer timed in the same run, a GPU
time taken with CUDA events, or a peak memory delta.
"""

import functools
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[2]

BLOCK = 6  # timed calls of each function per round
# Distinct input sets cycled through on the GPU, so repeated calls do not find their inputs in L2.
INPUT_SETS = 3


def alternating_medians(functions, rounds=5, block=BLOCK):
    """Median wall time in seconds of each function, timed in alternating blocks.

    Each round times ``block`` calls of every function in turn, after one untimed call: the
    blocks spread the machine's noise evenly over the functions compared, and the untimed call
    lets the previous function's worker threads (ONNX Runtime's and OpenMP's spin after their
    work) go idle first.
    """
    samples = [[] for _ in functions]
    for _ in range(rounds):
        for function, times in zip(functions, samples):
            function()
            for _ in range(block):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


class CpuComparison(NamedTuple):
    """pydeform and its CPU peer, each a call computing the same thing on the same data."""

    label: str  # what is computed, e.g. "roi_align forward, sampling_ratio 2"
    pydeform: Callable[[], object]
    peer: Callable[[], object]
    peer_name: str

    def medians(self, rounds=5):
        """(pydeform, peer) median seconds, timed in alternating blocks."""
        return alternating_medians([self.pydeform, self.peer], rounds)

    def speedup(self, rounds=3):
        """Peer time / pydeform time (>= 1: pydeform is faster)."""
        pydeform_seconds, peer_seconds = self.medians(rounds)
        return peer_seconds / pydeform_seconds


def require_onnx_models():
    """pydeform's ONNX Runtime model builders, or NotImplementedError (asv's way to skip) without ORT."""
    try:
        from pydeform import _onnx_models
    except ImportError:
        raise NotImplementedError("onnx / onnxruntime not installed") from None
    return _onnx_models


def require_cupy_gpu():
    """Return cupy, or raise NotImplementedError (asv's way to skip) when no GPU is usable."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # not installed, no driver, no device: all mean "skip"
        pass
    raise NotImplementedError("no CUDA GPU usable through CuPy")


def require_torchvision():
    """Return (torch, torchvision.ops), or raise NotImplementedError when absent or without CUDA."""
    try:
        import torch
        import torchvision.ops
    except ImportError:
        raise NotImplementedError("torchvision not installed") from None
    if not torch.cuda.is_available():
        raise NotImplementedError("torch finds no CUDA GPU")
    return torch, torchvision.ops


def cuda_median_ms(cupy, call, repeats=50, warmup=5):
    """Median milliseconds of ``call(index)`` timed with CUDA events on the legacy default
    stream, which CuPy and PyTorch both use by default; ``index`` counts the calls so the
    caller can rotate its input sets."""
    for index in range(warmup):
        call(index)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for index in range(repeats):
        start.record()
        call(index)
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(samples)
