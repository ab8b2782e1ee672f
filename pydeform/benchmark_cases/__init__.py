"""What pydeform is benchmarked on: the standard shapes (docs/benchmarks.md), their inputs, and the peers.

The one source of truth shared by the asv suite (``asv_benchmarks/``) and
``python -m pydeform bench``:

- :func:`cases` lists the :class:`Case` s, one op at one standard shape on the GPU or the CPU;
- :func:`host_inputs` builds a case's inputs as NumPy arrays (deterministic for a seed, never
  all-zero) and :func:`device_inputs` converts them to a dtype on NumPy or CuPy;
- :func:`pydeform_calls` and :func:`peer_calls` return the :class:`Calls` (zero-argument forward
  and forward + backward callables) of pydeform and of the case's peer: torchvision on the GPU,
  ONNX Runtime on the CPU, the PyTorch CenterNet decode (written here) on both, torch's
  conv_transpose2d and the depthwise deform_conv2d for the Deformable U-Net ops, the instance mean
  loss in PyTorch ops, scikit-image (CPU) and cuCIM (GPU) for the level-set ops;
  :class:`PeerUnavailable` says why a peer cannot run on this machine;
- timing helpers: :func:`alternating_medians` (CPU wall time, the functions interleaved),
  :func:`cuda_median_ms` (CUDA events), :func:`floor_bytes` and :func:`copy_bandwidth` (the
  bytes a forward must move and the device's bandwidth: its time floor), and the peak extra
  device memory of a call.

One module per op family (``deform_conv``, ``roi``, ``centernet``, ``deform_unet``,
``semiconv``, ``levelset``)
names its ops in ``OPS`` and ``DETERMINISTIC_OPS`` and yields its cases from ``standard_cases()``;
:mod:`.common` holds what they share. A new family adds a module to :data:`FAMILIES`.

Importing this package needs NumPy only; CuPy, torch, torchvision and onnxruntime are imported
when something that needs them is built.
"""

from __future__ import annotations

from typing import Optional

from . import centernet, deform_conv, deform_unet, levelset, roi, semiconv
from .centernet import torch_centernet_decode
from .common import (
    BLOCK, INPUT_SETS, Calls, Case, PeerUnavailable, alternating_medians, copy_bandwidth, cuda_median_ms,
    cupy_peak_extra_mib, device_inputs, floor_bytes, host_inputs, peer_calls, pydeform_calls, torch_peak_extra_mib,
)
from .roi import CPU_ROI_MAP, CPU_ROIS, GPU_ROI_MAP, GPU_ROIS, ROI_SIDES, STRIDE, random_rois
from .semiconv import torch_instance_mean_loss

__all__ = [
    "BLOCK",
    "CPU_ROIS",
    "CPU_ROI_MAP",
    "DETERMINISTIC_FORWARD_OPS",
    "DETERMINISTIC_OPS",
    "FAMILIES",
    "GPU_ROIS",
    "GPU_ROI_MAP",
    "INPUT_SETS",
    "OPS",
    "ROI_SIDES",
    "STRIDE",
    "Calls",
    "Case",
    "PeerUnavailable",
    "alternating_medians",
    "cases",
    "copy_bandwidth",
    "cuda_median_ms",
    "cupy_peak_extra_mib",
    "device_inputs",
    "floor_bytes",
    "host_inputs",
    "peer_calls",
    "pydeform_calls",
    "random_rois",
    "torch_centernet_decode",
    "torch_instance_mean_loss",
    "torch_peak_extra_mib",
]

#: The family modules, in the order their cases are listed.
FAMILIES = (deform_conv, roi, centernet, deform_unet, semiconv, levelset)
OPS = tuple(op for family in FAMILIES for op in family.OPS)
#: The ops whose GPU backward scatters with float atomics, so has a deterministic mode.
DETERMINISTIC_OPS = tuple(op for family in FAMILIES for op in family.DETERMINISTIC_OPS)
#: The ops whose GPU forward scatters with float atomics (deterministic mode of the forward).
DETERMINISTIC_FORWARD_OPS = tuple(op for family in FAMILIES for op in getattr(family, "DETERMINISTIC_FORWARD_OPS", ()))


def _deterministic_cases(cases):
    """The deterministic mode (``deterministic=True``) beside the atomic one: a twin of the
    first GPU case of each op of DETERMINISTIC_OPS (the backward's mode) and
    DETERMINISTIC_FORWARD_OPS (the forward's), without a peer (none has a deterministic mode at
    a comparable cost). On the CPU the Numba kernels are deterministic either way."""
    seen = set()
    for case in cases:
        if case.device != "gpu" or case.op in seen:
            continue
        if case.op in DETERMINISTIC_OPS:
            seen.add(case.op)
            yield case._replace(name=f"{case.name}-deterministic", workload=f"{case.workload}, deterministic backward",
                                peer=None, backward_options={"deterministic": True})
        elif case.op in DETERMINISTIC_FORWARD_OPS:
            seen.add(case.op)
            yield case._replace(name=f"{case.name}-deterministic", workload=f"{case.workload}, deterministic forward",
                                peer=None, forward_options={"deterministic": True})


def cases(op: Optional[str] = None, device: Optional[str] = None, quick: bool = False) -> list:
    """The benchmark cases, optionally of one ``op`` and one ``device`` ("gpu" or "cpu");
    ``quick`` keeps the first case of each op on each device."""
    if op is not None and op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    if device not in (None, "gpu", "cpu"):
        raise ValueError(f"device: expected None, 'gpu' or 'cpu', got {device!r}")
    selected, seen = [], set()
    standard = [case for family in FAMILIES for case in family.standard_cases()]
    for case in (*standard, *_deterministic_cases(standard)):
        if (op is None or case.op == op) and (device is None or case.device == device):
            if not quick or (case.op, case.device) not in seen:
                selected.append(case)
                seen.add((case.op, case.device))
    return selected
