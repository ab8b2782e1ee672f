"""What pydeform is benchmarked on: the standard shapes (docs/benchmarks.md), their inputs, and the peers.

The one source of truth shared by the asv suite (``asv_benchmarks/``) and
``python -m pydeform bench``:

- :func:`cases` lists the :class:`Case` s, one op at one standard shape on the GPU or the CPU;
- :func:`host_inputs` builds a case's inputs as NumPy arrays (deterministic for a seed, never
  all-zero) and :func:`device_inputs` converts them to a dtype on NumPy or CuPy;
- :func:`pydeform_calls` and :func:`peer_calls` return the :class:`Calls` (zero-argument forward
  and forward + backward callables) of pydeform and of the case's peer: torchvision on the GPU,
  ONNX Runtime on the CPU, the PyTorch CenterNet decode (written here) on both;
  :class:`PeerUnavailable` says why a peer cannot run on this machine;
- timing helpers: :func:`alternating_medians` (CPU wall time, the functions interleaved),
  :func:`cuda_median_ms` (CUDA events), :func:`floor_bytes` and :func:`copy_bandwidth` (the
  bytes a forward must move and the device's bandwidth: its time floor), and the peak extra
  device memory of a call.

Importing this module needs NumPy only; CuPy, torch, torchvision and onnxruntime are imported
when something that needs them is built.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

__all__ = [
    "BLOCK",
    "CPU_ROIS",
    "CPU_ROI_MAP",
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
    "torch_peak_extra_mib",
]

OPS = (
    "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "deform_roi_pool",
    "deform_psroi_pool", "centernet_decode", "centernet_targets", "centernet_focal_loss",
)

#: Timed calls of each function per round of :func:`alternating_medians`.
BLOCK = 6
#: Distinct input sets (seeds) a GPU benchmark cycles through, so that repeated calls do not
#: find their inputs in L2.
INPUT_SETS = 3


class PeerUnavailable(RuntimeError):
    """The case has no peer, or its peer's library or device is missing here (the message says which)."""


class Case(NamedTuple):
    """One op at one standard shape on one device."""

    op: str  # the pydeform function, e.g. "roi_align"
    name: str  # tells the op's cases on one device apart, e.g. "7x7-sampling2"
    device: str  # "gpu" or "cpu"
    workload: str  # the shape in words, for tables and docs/benchmarks.md
    dtypes: tuple  # dtype names benchmarked: float32, and bfloat16 on the GPU where the op takes it
    build: Callable[[int], dict]  # seed -> host arrays, see host_inputs
    options: dict  # keyword arguments of the op (and of its backward) besides the arrays
    backward: bool  # the op has a ``<op>_backward``
    peer: Optional[str]  # what the peer is, e.g. "torchvision.ops.roi_align"; None: no peer
    # (host inputs, itemsize of the dtype) -> bytes the forward must move at least (its
    # bandwidth floor, see floor_bytes); None: no floor defined
    floor: Optional[Callable[[dict, int], int]] = None
    # keyword arguments of the backward only (``deterministic=True`` of the deterministic cases)
    backward_options: Optional[dict] = None

    @property
    def id(self) -> str:
        return f"{self.op}/{self.device}/{self.name}"


class Calls(NamedTuple):
    """Zero-argument callables running one implementation of a case on fixed inputs."""

    forward: Callable[[], object]
    forward_backward: Optional[Callable[[], object]]  # None: no backward to time (e.g. ONNX Runtime)


# --- inputs ----------------------------------------------------------------------------------

#: Arrays kept in float32 whatever the benchmarked dtype: box coordinates of hundreds of pixels
#: are not representable in bfloat16, and pydeform takes them in the accumulation dtype.
_FLOAT32_ARRAYS = ("rois", "boxes")


def host_inputs(case: Case, seed: int = 0) -> dict:
    """The arrays of ``case`` as C-contiguous NumPy arrays: float32 data, int64 labels.

    Keys are the op's argument names, plus ``grad_output`` (the backward's first argument) when
    the op has a backward. The same seed gives the same arrays; none is all-zero.
    """
    return case.build(seed)


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # registers bfloat16 with NumPy

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def device_inputs(host: dict, dtype: str, xp=np) -> dict:
    """``host`` (from :func:`host_inputs`) with its float arrays in ``dtype`` (rois and boxes stay
    float32, integer arrays unchanged) as ``xp`` arrays (``numpy`` or ``cupy``)."""
    converted = {}
    for name, array in host.items():
        if array.dtype.kind == "f" and name not in _FLOAT32_ARRAYS:
            array = array.astype(_dtype(dtype))
        converted[name] = xp.asarray(array)
    return converted


def floor_bytes(case: Case, dtype: str, seed: int = 0) -> int:
    """Bytes the forward of ``case`` must move at least in ``dtype`` on the inputs of ``seed``:
    divided by the device bandwidth, the time no implementation can beat. Raises ValueError when
    the case defines no floor."""
    if case.floor is None:
        raise ValueError(f"{case.id} defines no bandwidth floor")
    return case.floor(host_inputs(case, seed), _dtype(dtype).itemsize)


def _heat_read_once(host, itemsize):
    """centernet_decode: the heatmap read once (wh, reg and the detections are K entries each)."""
    return host["heat"].size * itemsize


def _rule_b_lines(coordinates, size):
    """The pixel lines (rows or columns) that rule-B (border-clamped) bilinear samples at
    ``coordinates`` read with a non-zero weight on an axis of ``size`` pixels (docs/roi.md)."""
    coordinates = coordinates[(coordinates >= -1) & (coordinates <= size)]
    clamped = np.maximum(coordinates, 0)
    low = np.minimum(np.floor(clamped).astype(np.int64), size - 1)
    high = (low + 1)[(low < size - 1) & (clamped > low)]
    return np.unique(np.concatenate([low, high]))


def _roi_align_floor(output_size, spatial_scale, sampling_ratio, aligned):
    """roi_align (avg): every input pixel some sample reads, once, plus the output written once.

    A roi's samples form a grid, so the pixels they read are the rows its sample rows read
    times the columns its sample columns read; rois of one image share pixels.
    """

    def floor(host, itemsize):
        input, rois = host["input"], host["rois"].astype(np.float64)
        n, channels, height, width = input.shape
        offset = 0.5 if aligned else 0.0
        read = np.zeros((n, height, width), bool)
        for batch, x1, y1, x2, y2 in rois:
            x1, y1, x2, y2 = (value * spatial_scale - offset for value in (x1, y1, x2, y2))
            lines = []
            for start, length, size in ((y1, y2 - y1, height), (x1, x2 - x1, width)):
                length = length if aligned else max(length, 1.0)
                bin_size = length / output_size
                grid = sampling_ratio if sampling_ratio > 0 else int(np.ceil(length / output_size))
                cells = np.arange(output_size * grid)
                lines.append(_rule_b_lines(start + (cells // grid) * bin_size + (cells % grid + 0.5) * bin_size / grid,
                                           size))
            read[int(batch)][np.ix_(*lines)] = True
        output = len(rois) * channels * output_size**2
        return (int(read.sum()) * channels + output) * itemsize

    return floor


def _normal(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _uniform(rng, low, high, shape):
    return rng.uniform(low, high, shape).astype(np.float32)


def _deform_conv_inputs(n, channels, height, width):
    """A 3x3, pad 1 DCNv2 layer with C -> C channels: offsets up to 2 pixels, mask in (0, 1),
    weights scaled like a trained layer's."""
    points = 9

    def build(seed):
        rng = np.random.default_rng(seed)
        return {
            "input": _normal(rng, (n, channels, height, width)),
            "offset": _uniform(rng, -2.0, 2.0, (n, 2 * points, height, width)),
            "weight": _normal(rng, (channels, channels, 3, 3)) / np.float32(np.sqrt(channels * points)),
            "bias": _normal(rng, (channels,)),
            "mask": _uniform(rng, 0.0, 1.0, (n, points, height, width)),
            "grad_output": _normal(rng, (n, channels, height, width)),
        }

    return build


STRIDE = 4  # feature-map stride of the RoI and CenterNet shapes
ROI_SIDES = (16.0, 400.0)  # roi widths and heights in image pixels, log-uniform


def random_rois(rng, count, map_shape):
    """float32 ``[count, 5]`` rows (batch_index, x1, y1, x2, y2) in the image pixels of a
    stride-4 map of ``map_shape`` (N, C, H, W): sides log-uniform in ROI_SIDES, inside the image."""
    batch, _, height, width = map_shape
    image = np.array([width, height]) * STRIDE
    sides = np.exp(rng.uniform(*np.log(ROI_SIDES), (count, 2)))
    starts = rng.uniform(0.0, 1.0, (count, 2)) * (image - sides)
    return np.column_stack([rng.integers(0, batch, count), starts, starts + sides]).astype(np.float32)


def _roi_inputs(map_shape, count, output_channels, pooled, extra=None):
    """A feature map, ``count`` rois, the output gradient ``[count, output_channels, pooled,
    pooled]``, and the arrays ``extra(rng)`` adds (offsets, masks)."""

    def build(seed):
        rng = np.random.default_rng(seed)
        arrays = {"input": _normal(rng, map_shape), "rois": random_rois(rng, count, map_shape)}
        if extra is not None:
            arrays.update(extra(rng))
        arrays["grad_output"] = _normal(rng, (count, output_channels, pooled, pooled))
        return arrays

    return build


def _gaussian_blobs(rng, batch, classes, height, width, objects):
    """``[batch, classes, height, width]`` float32 in [0, 1]: per image, ``objects`` Gaussians
    of random classes, centres and sizes, peaking at exactly 1, combined by maximum (the shape of
    a CenterNet target heatmap)."""
    heat = np.zeros((batch, classes, height, width), np.float32)
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    for b in range(batch):
        for label, cy, cx, sigma in zip(rng.integers(0, classes, objects), rng.integers(0, height, objects),
                                        rng.integers(0, width, objects), rng.uniform(1.0, 8.0, objects)):
            blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
            np.maximum(heat[b, label], blob, out=heat[b, label])
    return heat


def _sigmoid(x):
    return (1 / (1 + np.exp(-x))).astype(np.float32)


def _decode_inputs(batch, classes, height, width, objects=20):
    """A sigmoid heatmap (low noise with many small local maxima, plus ``objects`` peaked objects
    per image), box sizes of 2..64 cells and sub-pixel offsets in [0, 1)."""

    def build(seed):
        rng = np.random.default_rng(seed)
        noise = _sigmoid(_normal(rng, (batch, classes, height, width)) - 4)
        return {
            "heat": np.maximum(noise, _gaussian_blobs(rng, batch, classes, height, width, objects)),
            "wh": _uniform(rng, 2.0, 64.0, (batch, 2, height, width)),
            "reg": _uniform(rng, 0.0, 1.0, (batch, 2, height, width)),
        }

    return build


def _targets_inputs(batch, max_boxes, image_size):
    """Per image 1..max_boxes boxes of 8..256 pixels inside an ``image_size`` square image, the
    rest padding (label -1)."""

    def build(seed):
        rng = np.random.default_rng(seed)
        sides = np.exp(rng.uniform(np.log(8.0), np.log(256.0), (batch, max_boxes, 2)))
        starts = rng.uniform(0.0, 1.0, (batch, max_boxes, 2)) * (image_size - sides)
        labels = rng.integers(0, 80, (batch, max_boxes))
        counts = rng.integers(1, max_boxes + 1, batch)
        labels[np.arange(max_boxes)[None, :] >= counts[:, None]] = -1
        return {"boxes": np.concatenate([starts, starts + sides], axis=2).astype(np.float32),
                "labels": labels.astype(np.int64)}

    return build


def _focal_inputs(batch, classes, height, width, objects=20):
    """Predictions in (0, 1) and a Gaussian target heatmap with ``objects`` positives per image."""

    def build(seed):
        rng = np.random.default_rng(seed)
        return {
            "pred": _sigmoid(_normal(rng, (batch, classes, height, width)) - 2),
            "target": _gaussian_blobs(rng, batch, classes, height, width, objects),
            "grad_output": np.array(1.5, np.float32),
        }

    return build


# --- the standard shapes ---------------------------------------------------------------------

_GPU_DTYPES = ("float32", "bfloat16")
_CPU_DTYPES = ("float32",)
_TORCHVISION = "torchvision.ops.{}"
_ONNXRUNTIME = "onnxruntime {} (CPU)"
_TORCH_DECODE = "PyTorch decode (max_pool2d, eq, topk, topk, gather)"

GPU_ROI_MAP = (2, 256, 200, 304)  # stride 4 of an 800x1216 image
GPU_ROIS = 512
CPU_ROI_MAP = (1, 64, 100, 152)  # stride 4 of 400x608
CPU_ROIS = 256
_SAMPLING = {"sampling2": 2, "adaptive": -1}  # <= 0: adaptive (ONNX Runtime spells it 0)
_SAMPLING_WORDS = {"sampling2": "sampling_ratio 2", "adaptive": "adaptive sampling"}


def _ps_channels(channels, pooled):
    """The largest multiple of pooled^2 channels not above ``channels`` (at least one group)."""
    cells = pooled * pooled
    return max(1, channels // cells) * cells


def _deform_conv_cases():
    gpu_shapes = [(16, 256, 64, 64), (8, 64, 128, 128),
                  (64, 128, 56, 56), (64, 256, 28, 28), (64, 512, 14, 14), (64, 1024, 7, 7)]
    for device, shapes, dtypes, peer in (
        ("gpu", gpu_shapes, _GPU_DTYPES, _TORCHVISION.format("deform_conv2d")),
        ("cpu", [(2, 64, 64, 64)], _CPU_DTYPES, _ONNXRUNTIME.format("DeformConv")),
    ):
        for n, c, h, w in shapes:
            yield Case("deform_conv2d", f"N{n}-C{c}-{h}x{w}", device,
                       f"N={n}, C={c} -> {c}, {h}x{w}, 3x3, pad 1, with mask", dtypes,
                       _deform_conv_inputs(n, c, h, w), {"padding": 1}, True, peer)


def _roi_cases():
    for device, map_shape, count, dtypes, sizes in (
        ("gpu", GPU_ROI_MAP, GPU_ROIS, _GPU_DTYPES, (7, 14)),
        ("cpu", CPU_ROI_MAP, CPU_ROIS, _CPU_DTYPES, (7,)),
    ):
        n, channels, height, width = map_shape
        where = f"{count} rois (16..400 px) on N={n}, {height}x{width}, stride 4"
        scale = {"spatial_scale": 1 / STRIDE}
        for pooled in sizes:
            ps_map = (n, _ps_channels(channels, pooled), height, width)
            ps_out = ps_map[1] // pooled**2
            for sampling, ratio in _SAMPLING.items():
                options = dict(output_size=pooled, sampling_ratio=ratio, **scale)
                yield Case("roi_align", f"{pooled}x{pooled}-{sampling}", device,
                           f"{where}, C={channels}, {pooled}x{pooled}, aligned, {_SAMPLING_WORDS[sampling]}", dtypes,
                           _roi_inputs(map_shape, count, channels, pooled), dict(options, aligned=True), True,
                           _TORCHVISION.format("roi_align") if device == "gpu" else _ONNXRUNTIME.format("RoiAlign"),
                           _roi_align_floor(pooled, 1 / STRIDE, ratio, True))
                yield Case("ps_roi_align", f"{pooled}x{pooled}-{sampling}", device,
                           f"{where}, C={ps_map[1]} -> {ps_out}, {pooled}x{pooled}, {_SAMPLING_WORDS[sampling]}",
                           dtypes,
                           _roi_inputs(ps_map, count, ps_out, pooled), options, True,
                           _TORCHVISION.format("ps_roi_align") if device == "gpu" else None)
            options = dict(output_size=pooled, **scale)
            yield Case("roi_pool", f"{pooled}x{pooled}", device, f"{where}, C={channels}, {pooled}x{pooled}", dtypes,
                       _roi_inputs(map_shape, count, channels, pooled), options, True,
                       _TORCHVISION.format("roi_pool") if device == "gpu" else _ONNXRUNTIME.format("MaxRoiPool"))
            yield Case("ps_roi_pool", f"{pooled}x{pooled}", device,
                       f"{where}, C={ps_map[1]} -> {ps_out}, {pooled}x{pooled}", dtypes,
                       _roi_inputs(ps_map, count, ps_out, pooled), options, True,
                       _TORCHVISION.format("ps_roi_pool") if device == "gpu" else None)

        # The deformable RoI pools at 7x7: mmcv's modulated DeformRoIPool (offset and mask,
        # gamma 0.1, sampling_ratio 2) and Deformable R-FCN's class-agnostic PS pooling
        # (group_size 7, 4x4 samples per part, trans_std 0.1).
        pooled = 7

        def offset_and_mask(rng, count=count):
            return {"offset": _uniform(rng, -1.0, 1.0, (count, 2, pooled, pooled)),
                    "mask": _uniform(rng, 0.0, 1.0, (count, 1, pooled, pooled))}

        def trans(rng, count=count):
            return {"trans": _uniform(rng, -1.0, 1.0, (count, 2, pooled, pooled))}

        yield Case("deform_roi_pool", "7x7-sampling2-modulated", device,
                   f"{where}, C={channels}, 7x7, sampling_ratio 2, gamma 0.1, offset and mask", dtypes,
                   _roi_inputs(map_shape, count, channels, pooled, offset_and_mask),
                   dict(output_size=pooled, sampling_ratio=2, gamma=0.1, **scale), True, None)
        ps_map = (n, _ps_channels(channels, pooled), height, width)
        ps_out = ps_map[1] // pooled**2
        yield Case("deform_psroi_pool", "7x7-group7", device,
                   f"{where}, C={ps_map[1]} -> {ps_out}, 7x7, group 7, 4x4 samples per part, trans", dtypes,
                   _roi_inputs(ps_map, count, ps_out, pooled, trans),
                   dict(output_dim=ps_out, group_size=pooled, pooled_size=pooled, sample_per_part=4,
                        trans_std=0.1, **scale), True, None)


def _centernet_cases():
    # COCO at 512x512, stride 4: 80 classes on a 128x128 map; the CPU runs two images.
    for device, batch, dtypes in (("gpu", 8, _GPU_DTYPES), ("cpu", 2, _CPU_DTYPES)):
        shape = f"B={batch}, 80 classes, 128x128"
        yield Case("centernet_decode", f"B{batch}-C80-128x128-K100", device, f"{shape}, K=100, 3x3 peaks, reg",
                   dtypes, _decode_inputs(batch, 80, 128, 128), {"K": 100}, False, _TORCH_DECODE, _heat_read_once)
        yield Case("centernet_targets", f"B{batch}-C80-128x128-M64", device,
                   f"{shape} targets, up to 64 boxes per image (8..256 px in 512x512)", ("float32",),
                   _targets_inputs(batch, 64, 512.0),
                   {"num_classes": 80, "output_size": (128, 128), "down_ratio": 4}, False, None)
        yield Case("centernet_focal_loss", f"B{batch}-C80-128x128", device, f"{shape}, 20 objects per image",
                   dtypes, _focal_inputs(batch, 80, 128, 128), {}, True, None)


#: The ops whose GPU backward scatters with float atomics, so has a deterministic mode.
DETERMINISTIC_OPS = ("deform_conv2d", "roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool",
                     "deform_psroi_pool")


def _deterministic_cases(cases):
    """The deterministic backward (``deterministic=True``) beside the atomic one: a twin of the
    first GPU case of each op of DETERMINISTIC_OPS, without a peer (none has a deterministic
    backward at a comparable cost). On the CPU the Numba backward is deterministic either way."""
    seen = set()
    for case in cases:
        if case.device == "gpu" and case.op in DETERMINISTIC_OPS and case.op not in seen:
            seen.add(case.op)
            yield case._replace(name=f"{case.name}-deterministic", workload=f"{case.workload}, deterministic backward",
                                peer=None, backward_options={"deterministic": True})


def cases(op: Optional[str] = None, device: Optional[str] = None, quick: bool = False) -> list:
    """The benchmark cases, optionally of one ``op`` and one ``device`` ("gpu" or "cpu");
    ``quick`` keeps the first case of each op on each device."""
    if op is not None and op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    if device not in (None, "gpu", "cpu"):
        raise ValueError(f"device: expected None, 'gpu' or 'cpu', got {device!r}")
    selected, seen = [], set()
    standard = (*_deform_conv_cases(), *_roi_cases(), *_centernet_cases())
    for case in (*standard, *_deterministic_cases(standard)):
        if (op is None or case.op == op) and (device is None or case.device == device):
            if not quick or (case.op, case.device) not in seen:
                selected.append(case)
                seen.add((case.op, case.device))
    return selected


# --- pydeform and the peers ------------------------------------------------------------------


def pydeform_calls(case: Case, arrays: dict, backend: Optional[str] = None) -> Calls:
    """pydeform's op on ``arrays`` (from :func:`device_inputs`), with the case's options and
    ``backend=``; the forward + backward is None when the op has no backward."""
    import pydeform

    forward_op = getattr(pydeform, case.op)
    inputs = {name: array for name, array in arrays.items() if name != "grad_output"}

    def forward():
        return forward_op(**inputs, **case.options, backend=backend)

    if not case.backward:
        return Calls(forward, None)
    backward_op = getattr(pydeform, f"{case.op}_backward")

    def forward_backward():
        forward()
        return backward_op(arrays["grad_output"], **inputs, **case.options, **(case.backward_options or {}),
                           backend=backend)

    return Calls(forward, forward_backward)


def peer_calls(case: Case, host: dict, dtype: str) -> Calls:
    """The case's peer on ``host`` (from :func:`host_inputs`) in ``dtype``: on the GPU with torch
    tensors on CUDA, on the CPU with NumPy arrays (ONNX Runtime) or torch CPU tensors (the
    decode). Raises :class:`PeerUnavailable` when there is none or it cannot run here."""
    if case.peer is None:
        raise PeerUnavailable(f"{case.op} has no peer")
    if case.op == "centernet_decode":
        return _torch_decode_calls(case, host, dtype)
    if case.device == "gpu":
        return _torchvision_calls(case, host, dtype)
    return _onnxruntime_calls(case, host)


def _require_torch(cuda: bool):
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("torch is not installed") from None
    if cuda and not torch.cuda.is_available():
        raise PeerUnavailable("torch finds no CUDA GPU")
    return torch


def _torch_dtype(torch, dtype):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _torchvision_calls(case, host, dtype):
    """torchvision.ops' op of the same name, its backward through autograd. In bfloat16 it runs
    under autocast: torchvision's kernels then compute in float32 (that is the path a bfloat16
    model takes)."""
    torch = _require_torch(cuda=True)
    try:
        import torchvision.ops
    except ImportError:
        raise PeerUnavailable("torchvision is not installed") from None
    function = getattr(torchvision.ops, case.op)
    tensor_dtype = _torch_dtype(torch, dtype)
    tensors = {
        # torchvision calls the rois "boxes" and keeps them in float32 like pydeform.
        "boxes" if name == "rois" else name:
            torch.from_numpy(array).to("cuda", torch.float32 if name == "rois" else tensor_dtype)
        for name, array in host.items()
    }
    grad_output = tensors.pop("grad_output")
    differentiable = [tensor.requires_grad_() for name, tensor in tensors.items() if name != "boxes"]
    autocast = dtype != "float32"

    def output():
        with torch.autocast("cuda", dtype=tensor_dtype, enabled=autocast):
            return function(**tensors, **case.options)

    def forward():
        with torch.no_grad():
            return output()

    def forward_backward():
        result = output()
        return torch.autograd.grad(result, differentiable, grad_output.to(result.dtype))

    return Calls(forward, forward_backward)


def torch_centernet_decode(heat, wh, reg, K, kernel=3):
    """The PyTorch CenterNet decode the fused kernel replaces, on torch tensors: max_pool2d peak
    test, a per-class top-K, a global top-K of those, gathers of the centre, size and offset.

    Args:
        heat: ``[B, C, H, W]`` scores; wh, reg: ``[B, 2, H, W]``; K <= H*W.

    Returns:
        ``[B, K, 6]`` rows (x1, y1, x2, y2, score, class) in heat's dtype. Equal scores may come
        in another order than pydeform's (lowest flat index first): torch.topk does not order ties.
        Unlike the original code, which first copies wh and reg to channels-last
        (``_transpose_and_gather_feat``), it gathers straight from the channel planes.
    """
    import torch

    batch, classes, height, width = heat.shape
    window_max = torch.nn.functional.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
    peaks = heat * (window_max == heat).to(heat.dtype)
    class_scores, class_pixels = torch.topk(peaks.view(batch, classes, height * width), K)  # [B, C, K]
    scores, picked = torch.topk(class_scores.view(batch, classes * K), K)  # [B, K]
    pixels = class_pixels.view(batch, classes * K).gather(1, picked)
    planes = pixels.unsqueeze(1).expand(batch, 2, K)

    def at_peaks(feature):  # [B, 2, H, W] -> [B, 2, K]
        return feature.reshape(batch, 2, height * width).gather(2, planes)

    offset, size = at_peaks(reg), at_peaks(wh)
    xs = (pixels % width).to(heat.dtype) + offset[:, 0]
    ys = torch.div(pixels, width, rounding_mode="floor").to(heat.dtype) + offset[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    classes_of = torch.div(picked, K, rounding_mode="floor").to(heat.dtype)
    return torch.stack([xs - half_w, ys - half_h, xs + half_w, ys + half_h, scores, classes_of], dim=2)


def _torch_decode_calls(case, host, dtype):
    torch = _require_torch(cuda=case.device == "gpu")
    device = "cuda" if case.device == "gpu" else "cpu"
    tensors = {name: torch.from_numpy(array).to(device, _torch_dtype(torch, dtype)) for name, array in host.items()}

    def forward():
        with torch.no_grad():
            return torch_centernet_decode(tensors["heat"], tensors["wh"], tensors["reg"], case.options["K"])

    return Calls(forward, None)


def _onnxruntime_calls(case, host):
    """ONNX Runtime's CPU operator of the op, forward only (ORT has no backward of these)."""
    try:
        from . import _onnx_models
    except ImportError as error:
        raise PeerUnavailable(f"onnx / onnxruntime not installed ({error})") from None
    o = case.options
    if case.op == "deform_conv2d":
        weight_shape = host["weight"].shape
        run = _onnx_models.deform_conv_session(weight_shape, 1, o["padding"], 1, 1, 1, has_bias=True,
                                               has_mask=True, dtype=np.float32)
        arguments = [host[name] for name in ("input", "weight", "offset", "bias", "mask")]
    elif case.op == "roi_align":
        run = _onnx_models.roi_align_session(o["output_size"], o["spatial_scale"], max(o["sampling_ratio"], 0),
                                             o["aligned"], "avg", np.float32)
        arguments = [host["input"], host["rois"]]
    elif case.op == "roi_pool":
        run = _onnx_models.max_roi_pool_session(o["output_size"], o["spatial_scale"])
        arguments = [host["input"], host["rois"]]
    else:
        raise PeerUnavailable(f"ONNX Runtime has no operator for {case.op}")
    return Calls(lambda: run(*arguments), None)


# --- timing ----------------------------------------------------------------------------------


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


def cuda_median_ms(cupy, call, repeats=50, warmup=5):
    """Median milliseconds of ``call(index)`` timed with CUDA events on the legacy default
    stream, which CuPy and PyTorch both use by default; ``index`` counts the calls so that the
    caller can rotate its input sets. The warm-up calls absorb compilation and allocation."""
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


def copy_bandwidth(cupy, mebibytes=512):
    """Measured device memory bandwidth in bytes per second: a device-to-device copy of
    ``mebibytes`` MiB reads and writes each byte once."""
    source = cupy.ones(mebibytes * 2**20, dtype=cupy.uint8)
    target = cupy.empty_like(source)
    milliseconds = cuda_median_ms(cupy, lambda index: cupy.copyto(target, source), repeats=20)
    return 2 * source.nbytes / (milliseconds * 1e-3)


def cupy_peak_extra_mib(cupy, call):
    """Device memory in MiB that ``call()`` needs beyond its inputs, as growth of CuPy's memory
    pool over one call started from an empty cache (the pool keeps freed blocks, so its size
    afterwards is the peak of the call). ``call`` runs twice: once to compile and warm up."""
    pool = cupy.get_default_memory_pool()
    call()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    call()
    cupy.cuda.Device().synchronize()
    return (pool.total_bytes() - before) / 2**20


def torch_peak_extra_mib(torch, call):
    """Peak device memory in MiB that ``call()`` allocates through torch beyond what was
    allocated before it (``torch.cuda.max_memory_allocated`` delta); ``call`` runs twice."""
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
