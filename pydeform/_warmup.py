"""``python -m pydeform warmup``: compile the kernels of chosen ops before their first use.

For container images and CI: every kernel an op's forward and backward use is compiled (or, if
already in the disk caches, loaded) for each chosen backend and dtype, by running the op once on
tiny inputs, the first case of the self-test's. Compiled kernels land in the Numba and CuPy disk
caches, from which later processes load them.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import selftest as st
from ._bench import _Progress
from .backends.compile_notice import cupy_cache_folder, numba_cache_folder, silenced
from .benchmark_cases import OPS
from .centernet import centernet_decode, centernet_focal_loss, centernet_targets
from .levelset import chan_vese, morphological_chan_vese, morphological_geodesic_active_contour
from .semiconv import hough_peaks, semiconv_embed


def _op_calls(calls: st.OpCalls) -> Callable:
    """Forward and backward (if the op has one) of an op of the self-test, on its first case."""

    def run(backend, dtype):
        case, arrays, grad_output = next(calls.cases(True))
        st.common.run_forward(calls, backend, dtype, case, arrays)
        if calls.backward is not None:
            st.common.run_backward(calls, backend, dtype, case, arrays, grad_output)

    return run


def _centernet_decode(backend, dtype):
    arrays, _ = st.centernet._centernet_decode_arrays(np.random.default_rng(0), planted=True)
    centernet_decode(**st.common.on_device(backend, dtype, arrays), **st.centernet.DECODE_OPTIONS[0],
                     backend=backend.option)


def _centernet_targets(backend, dtype):
    boxes = backend.to_device(np.array([st.centernet.TARGET_BOXES], dtype=np.float64), dtype)
    centernet_targets(boxes, backend.xp.asarray(np.array([st.centernet.TARGET_LABELS])), 3, (16, 20),
                      backend=backend.option)


def _centernet_focal_loss(backend, dtype):
    pred, target = st.centernet._focal_arrays(np.random.default_rng(0))
    centernet_focal_loss(backend.to_device(pred, dtype), backend.to_device(target, dtype), backend=backend.option)
    st.centernet._focal_grad(backend, dtype, pred, target)


def _snake(function):
    """Both snakes' selftest runs of ``function``: 2-D and 3-D, balloon both ways, smoothing 1-3."""

    def run(backend, dtype):
        for case_function, image, args, options in st.levelset.snake_cases(np.random.default_rng(0), quick=False):
            if case_function is function:
                st.levelset.run_op(backend, function, image, *args, dtype=dtype, **options)

    return run


def _chan_vese(backend, dtype):
    image = st.levelset.integer_image(np.random.default_rng(0), (8, 9))
    st.levelset.run_op(backend, chan_vese, image, dtype=dtype, max_num_iter=2, extended_output=True)


def _levelset_dtype(backend, dtype):
    """The level-set ops read any real dtype NumPy knows (not bfloat16) as float64."""
    return dtype != "bfloat16"
def _semiconv_embed(backend, dtype):
    semiconv_embed(backend.to_device(np.zeros((1, 2, 3, 4)), dtype), backend=backend.option)


def _hough_peaks(backend, dtype):
    hough_peaks(backend.xp.zeros((1, 4, 5), np.int32), 2, backend=backend.option)


def _float32(backend, dtype):
    """hough_peaks reads int32 votes (through the float32 CenterNet decode): one dtype."""
    return dtype == "float32"


class WarmupOp(NamedTuple):
    run: Callable  # run(backend, dtype): every kernel of the op once
    applies: Callable = st.every_run  # applies(backend, dtype): the op takes this dtype there


WARMUP = {
    "deform_conv2d": WarmupOp(_op_calls(st.deform_conv.DEFORM_CONV)),
    "roi_align": WarmupOp(_op_calls(st.roi.ROI_ALIGN)),
    "roi_pool": WarmupOp(_op_calls(st.roi.ROI_POOL)),
    "ps_roi_align": WarmupOp(_op_calls(st.roi.PS_ROI_ALIGN)),
    "ps_roi_pool": WarmupOp(_op_calls(st.roi.PS_ROI_POOL)),
    "deform_roi_pool": WarmupOp(_op_calls(st.roi.DEFORM_ROI_POOL)),
    "deform_psroi_pool": WarmupOp(_op_calls(st.roi.DEFORM_PSROI_POOL)),
    "centernet_decode": WarmupOp(_centernet_decode),
    "centernet_targets": WarmupOp(_centernet_targets, st.centernet._boxes_dtype),
    "centernet_focal_loss": WarmupOp(_centernet_focal_loss),
    "deform_conv_transpose2d": WarmupOp(_op_calls(st.deform_unet.DEFORM_CONV_TRANSPOSE)),
    "deform_pool2d": WarmupOp(_op_calls(st.deform_unet.DEFORM_POOL)),
    "semiconv_embed": WarmupOp(_semiconv_embed),
    "instance_means": WarmupOp(_op_calls(st.semiconv.INSTANCE_MEANS)),
    "instance_mean_loss": WarmupOp(_op_calls(st.semiconv.INSTANCE_MEAN_LOSS)),
    "affinity": WarmupOp(_op_calls(st.semiconv.AFFINITY)),
    "seeded_mask_logits": WarmupOp(_op_calls(st.semiconv.SEEDED_MASK_LOGITS)),
    "hough_votes": WarmupOp(_op_calls(st.semiconv.HOUGH_VOTES)),
    "hough_peaks": WarmupOp(_hough_peaks, _float32),
    "assign_to_centers": WarmupOp(_op_calls(st.semiconv.ASSIGN_TO_CENTERS)),
    "morphological_chan_vese": WarmupOp(_snake(morphological_chan_vese), _levelset_dtype),
    "morphological_geodesic_active_contour": WarmupOp(_snake(morphological_geodesic_active_contour),
                                                      _levelset_dtype),
    "chan_vese": WarmupOp(_chan_vese, _levelset_dtype),
}


class Step(NamedTuple):
    op: str
    backend: str
    dtype: str
    seconds: float
    compiled: int  # kernels (Numba) or modules (CuPy) written to the disk cache: compiled here

    @property
    def unit(self) -> str:
        return "module(s)" if self.backend == "cupy" else "kernel(s)"


def _cached_files(backend_name: str) -> set:
    """The compiled-kernel files in ``backend_name``'s disk cache: Numba writes one ``.nbc`` per
    compiled kernel and signature, CuPy one file per compiled module (none when it caches in memory)."""
    if backend_name == "cupy":
        folder, suffix = cupy_cache_folder(), ""
    else:
        folder, suffix = numba_cache_folder(), ".nbc"
    try:
        return {name for name in os.listdir(folder) if name.endswith(suffix)} if folder else set()
    except FileNotFoundError:
        return set()


def run_warmup(ops=None, device: Optional[str] = None, dtypes=None, backends=None, progress=None) -> list:
    """Run every op of ``ops`` (default all) on every backend of ``device`` (default all usable
    here) in every dtype of ``dtypes`` it supports (default all); the list of :class:`Step`."""
    if backends is None:
        backends, _ = st.discover_backends()
    backends = [b for b in backends if device is None or b.on_gpu == (device == "gpu")]
    jobs = [(op, backend, dtype) for op in (ops or OPS) for backend in backends for dtype in backend.dtypes
            if (dtypes is None or dtype in dtypes) and WARMUP[op].applies(backend, dtype)]
    bar = _Progress(len(jobs), sys.stderr if progress is None else progress)
    steps = []
    for done, (op, backend, dtype) in enumerate(jobs):
        bar.show(done, f"{op} {backend.name} {dtype}")
        before = _cached_files(backend.name)
        start = time.perf_counter()
        with silenced():
            WARMUP[op].run(backend, dtype)
        steps.append(Step(op, backend.name, dtype, time.perf_counter() - start,
                          len(_cached_files(backend.name) - before)))
    bar.show(len(jobs), "done")
    return steps


def main(ops, device, dtypes, out=None) -> int:
    """The command: warm up, then print one line per op, backend and dtype, and the total."""
    out = sys.stdout if out is None else out
    backends, skipped = st.discover_backends()
    if device == "gpu" and not any(b.on_gpu for b in backends):
        print(f"warmup: no GPU backend usable here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})",
              file=sys.stderr)
        return 1
    steps = run_warmup(ops, device, dtypes, backends)
    if not steps:
        print("warmup: nothing to compile for this selection (no usable backend takes these dtypes)", file=sys.stderr)
        return 1
    width = max(len(step.op) for step in steps)
    for step in steps:
        what = f"compiled {step.compiled} {step.unit}" if step.compiled else "nothing to compile (loaded from the cache)"
        print(f"{step.op:<{width}} {step.backend:<10} {step.dtype:<9} {what} in {step.seconds:.1f} s", file=out)
    compiled = sum(s.compiled for s in steps)
    caches = f"Numba cache: {numba_cache_folder()}"
    if any(s.backend == "cupy" for s in steps):
        caches += f", CuPy cache: {cupy_cache_folder() or 'in memory only (CUPY_CACHE_IN_MEMORY is set)'}"
    print(f"warmup: {len(steps)} op / backend / dtype combinations, {compiled} compiled, in "
          f"{sum(s.seconds for s in steps):.1f} s; {caches}", file=out)
    for name, reason in skipped.items():
        print(f"warmup: backend {name} not usable here: {reason}", file=out)
    return 0
