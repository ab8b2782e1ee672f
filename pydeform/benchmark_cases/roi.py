"""The RoI ops' benchmark cases: on the GPU 512 rois of 16..400 px on an N=2, C=256, 200x304 map
(stride 4) at 7x7 and 14x14 beside torchvision; on the CPU 256 rois on a C=64 100x152 map at
7x7 beside ONNX Runtime's RoiAlign and MaxRoiPool; the deformable RoI pools without a peer."""

from __future__ import annotations

import numpy as np

from .common import (
    CPU_DTYPES, GPU_DTYPES, ONNXRUNTIME, TORCHVISION, Calls, Case, normal, onnx_models, torchvision_calls, uniform,
)

OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")
#: The ops whose GPU backward scatters with float atomics, so has a deterministic mode.
DETERMINISTIC_OPS = ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")

STRIDE = 4  # feature-map stride of the RoI shapes
ROI_SIDES = (16.0, 400.0)  # roi widths and heights in image pixels, log-uniform
GPU_ROI_MAP = (2, 256, 200, 304)  # stride 4 of an 800x1216 image
GPU_ROIS = 512
CPU_ROI_MAP = (1, 64, 100, 152)  # stride 4 of 400x608
CPU_ROIS = 256
_SAMPLING = {"sampling2": 2, "adaptive": -1}  # <= 0: adaptive (ONNX Runtime spells it 0)
_SAMPLING_WORDS = {"sampling2": "sampling_ratio 2", "adaptive": "adaptive sampling"}


def _rule_b_lines(coordinates, size):
    """The pixel lines (rows or columns) that rule-B (border-clamped) bilinear samples at
    ``coordinates`` read with a non-zero weight on an axis of ``size`` pixels (docs/roi.md)."""
    coordinates = coordinates[(coordinates >= -1) & (coordinates <= size)]
    clamped = np.maximum(coordinates, 0)
    low = np.minimum(np.floor(clamped).astype(np.int64), size - 1)
    high = (low + 1)[(low < size - 1) & (clamped > low)]
    return np.unique(np.concatenate([low, high]))


def roi_align_floor(output_size, spatial_scale, sampling_ratio, aligned):
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
        arrays = {"input": normal(rng, map_shape), "rois": random_rois(rng, count, map_shape)}
        if extra is not None:
            arrays.update(extra(rng))
        arrays["grad_output"] = normal(rng, (count, output_channels, pooled, pooled))
        return arrays

    return build


def _ps_channels(channels, pooled):
    """The largest multiple of pooled^2 channels not above ``channels`` (at least one group)."""
    cells = pooled * pooled
    return max(1, channels // cells) * cells


def _onnx_roi_align_calls(case, host, dtype):
    """ONNX Runtime's RoiAlign (CPU, float32, avg), forward only."""
    o = case.options
    run = onnx_models().roi_align_session(o["output_size"], o["spatial_scale"], max(o["sampling_ratio"], 0),
                                          o["aligned"], "avg", np.float32)
    return Calls(lambda: run(host["input"], host["rois"]), None)


def _onnx_max_roi_pool_calls(case, host, dtype):
    """ONNX Runtime's MaxRoiPool (CPU, float32), forward only."""
    run = onnx_models().max_roi_pool_session(case.options["output_size"], case.options["spatial_scale"])
    return Calls(lambda: run(host["input"], host["rois"]), None)


def standard_cases():
    for device, map_shape, count, dtypes, sizes in (
        ("gpu", GPU_ROI_MAP, GPU_ROIS, GPU_DTYPES, (7, 14)),
        ("cpu", CPU_ROI_MAP, CPU_ROIS, CPU_DTYPES, (7,)),
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
                           TORCHVISION.format("roi_align") if device == "gpu" else ONNXRUNTIME.format("RoiAlign"),
                           roi_align_floor(pooled, 1 / STRIDE, ratio, True),
                           peer_builder=torchvision_calls if device == "gpu" else _onnx_roi_align_calls)
                yield Case("ps_roi_align", f"{pooled}x{pooled}-{sampling}", device,
                           f"{where}, C={ps_map[1]} -> {ps_out}, {pooled}x{pooled}, {_SAMPLING_WORDS[sampling]}",
                           dtypes,
                           _roi_inputs(ps_map, count, ps_out, pooled), options, True,
                           TORCHVISION.format("ps_roi_align") if device == "gpu" else None,
                           peer_builder=torchvision_calls)
            options = dict(output_size=pooled, **scale)
            yield Case("roi_pool", f"{pooled}x{pooled}", device, f"{where}, C={channels}, {pooled}x{pooled}", dtypes,
                       _roi_inputs(map_shape, count, channels, pooled), options, True,
                       TORCHVISION.format("roi_pool") if device == "gpu" else ONNXRUNTIME.format("MaxRoiPool"),
                       peer_builder=torchvision_calls if device == "gpu" else _onnx_max_roi_pool_calls)
            yield Case("ps_roi_pool", f"{pooled}x{pooled}", device,
                       f"{where}, C={ps_map[1]} -> {ps_out}, {pooled}x{pooled}", dtypes,
                       _roi_inputs(ps_map, count, ps_out, pooled), options, True,
                       TORCHVISION.format("ps_roi_pool") if device == "gpu" else None,
                       peer_builder=torchvision_calls)

        # The deformable RoI pools at 7x7: mmcv's modulated DeformRoIPool (offset and mask,
        # gamma 0.1, sampling_ratio 2) and Deformable R-FCN's class-agnostic PS pooling
        # (group_size 7, 4x4 samples per part, trans_std 0.1).
        pooled = 7

        def offset_and_mask(rng, count=count):
            return {"offset": uniform(rng, -1.0, 1.0, (count, 2, pooled, pooled)),
                    "mask": uniform(rng, 0.0, 1.0, (count, 1, pooled, pooled))}

        def trans(rng, count=count):
            return {"trans": uniform(rng, -1.0, 1.0, (count, 2, pooled, pooled))}

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
