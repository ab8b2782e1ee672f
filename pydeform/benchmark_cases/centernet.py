"""The CenterNet ops' benchmark cases: COCO at 512x512, stride 4 (80 classes on a 128x128 map),
B=8 on the GPU and B=2 on the CPU; the decode's peer is the PyTorch decode written here."""

from __future__ import annotations

import numpy as np

from .common import CPU_DTYPES, GPU_DTYPES, Calls, Case, normal, require_torch, torch_dtype, uniform

OPS = ("centernet_decode", "centernet_targets", "centernet_focal_loss")
DETERMINISTIC_OPS = ()
_TORCH_DECODE = "PyTorch decode (max_pool2d, eq, topk, topk, gather)"


def _heat_read_once(host, itemsize):
    """centernet_decode: the heatmap read once (wh, reg and the detections are K entries each)."""
    return host["heat"].size * itemsize


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
        noise = _sigmoid(normal(rng, (batch, classes, height, width)) - 4)
        return {
            "heat": np.maximum(noise, _gaussian_blobs(rng, batch, classes, height, width, objects)),
            "wh": uniform(rng, 2.0, 64.0, (batch, 2, height, width)),
            "reg": uniform(rng, 0.0, 1.0, (batch, 2, height, width)),
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
            "pred": _sigmoid(normal(rng, (batch, classes, height, width)) - 2),
            "target": _gaussian_blobs(rng, batch, classes, height, width, objects),
            "grad_output": np.array(1.5, np.float32),
        }

    return build


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
    torch = require_torch(cuda=case.device == "gpu")
    device = "cuda" if case.device == "gpu" else "cpu"
    tensors = {name: torch.from_numpy(array).to(device, torch_dtype(torch, dtype)) for name, array in host.items()}

    def forward():
        with torch.no_grad():
            return torch_centernet_decode(tensors["heat"], tensors["wh"], tensors["reg"], case.options["K"])

    return Calls(forward, None)


def standard_cases():
    # COCO at 512x512, stride 4: 80 classes on a 128x128 map; the CPU runs two images.
    for device, batch, dtypes in (("gpu", 8, GPU_DTYPES), ("cpu", 2, CPU_DTYPES)):
        shape = f"B={batch}, 80 classes, 128x128"
        yield Case("centernet_decode", f"B{batch}-C80-128x128-K100", device, f"{shape}, K=100, 3x3 peaks, reg",
                   dtypes, _decode_inputs(batch, 80, 128, 128), {"K": 100}, False, _TORCH_DECODE, _heat_read_once,
                   peer_builder=_torch_decode_calls)
        yield Case("centernet_targets", f"B{batch}-C80-128x128-M64", device,
                   f"{shape} targets, up to 64 boxes per image (8..256 px in 512x512)", ("float32",),
                   _targets_inputs(batch, 64, 512.0),
                   {"num_classes": 80, "output_size": (128, 128), "down_ratio": 4}, False, None)
        yield Case("centernet_focal_loss", f"B{batch}-C80-128x128", device, f"{shape}, 20 objects per image",
                   dtypes, _focal_inputs(batch, 80, 128, 128), {}, True, None)
