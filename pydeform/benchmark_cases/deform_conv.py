"""deform_conv2d's benchmark cases: on the GPU the DCNv2 layers (N=16, C=256 -> 256, 64x64; N=8,
C=64 -> 64, 128x128) and DCNv4's shapes beside torchvision; on the CPU N=2, C=64 -> 64, 64x64
beside ONNX Runtime's DeformConv."""

from __future__ import annotations

import numpy as np

from .common import (
    CPU_DTYPES, GPU_DTYPES, ONNXRUNTIME, TORCHVISION, Calls, Case, normal, onnx_models, torchvision_calls, uniform,
)

OPS = ("deform_conv2d",)
#: The ops whose GPU backward scatters with float atomics, so has a deterministic mode.
DETERMINISTIC_OPS = ("deform_conv2d",)


def _deform_conv_inputs(n, channels, height, width):
    """A 3x3, pad 1 DCNv2 layer with C -> C channels: offsets up to 2 pixels, mask in (0, 1),
    weights scaled like a trained layer's."""
    points = 9

    def build(seed):
        rng = np.random.default_rng(seed)
        return {
            "input": normal(rng, (n, channels, height, width)),
            "offset": uniform(rng, -2.0, 2.0, (n, 2 * points, height, width)),
            "weight": normal(rng, (channels, channels, 3, 3)) / np.float32(np.sqrt(channels * points)),
            "bias": normal(rng, (channels,)),
            "mask": uniform(rng, 0.0, 1.0, (n, points, height, width)),
            "grad_output": normal(rng, (n, channels, height, width)),
        }

    return build


def _onnxruntime_calls(case, host, dtype):
    """ONNX Runtime's DeformConv (CPU, float32), forward only (ORT has no backward of it)."""
    run = onnx_models().deform_conv_session(host["weight"].shape, 1, case.options["padding"], 1, 1, 1, has_bias=True,
                                            has_mask=True, dtype=np.float32)
    arguments = [host[name] for name in ("input", "weight", "offset", "bias", "mask")]
    return Calls(lambda: run(*arguments), None)


def standard_cases():
    gpu_shapes = [(16, 256, 64, 64), (8, 64, 128, 128),
                  (64, 128, 56, 56), (64, 256, 28, 28), (64, 512, 14, 14), (64, 1024, 7, 7)]
    for device, shapes, dtypes, peer, peer_builder in (
        ("gpu", gpu_shapes, GPU_DTYPES, TORCHVISION.format("deform_conv2d"), torchvision_calls),
        ("cpu", [(2, 64, 64, 64)], CPU_DTYPES, ONNXRUNTIME.format("DeformConv"), _onnxruntime_calls),
    ):
        for n, c, h, w in shapes:
            yield Case("deform_conv2d", f"N{n}-C{c}-{h}x{w}", device,
                       f"N={n}, C={c} -> {c}, {h}x{w}, 3x3, pad 1, with mask", dtypes,
                       _deform_conv_inputs(n, c, h, w), {"padding": 1}, True, peer,
                       peer_builder=peer_builder)
