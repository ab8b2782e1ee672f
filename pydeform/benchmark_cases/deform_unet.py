"""The Deformable U-Net ops' benchmark cases.

- deform_conv_transpose2d, 3x3, stride 2, pad 1, output_padding 1, 32x32 -> 64x64, with mask:
  on the GPU N=16, C=256 -> 128, plus a zero-offset, unmasked twin beside torch's
  conv_transpose2d (cuDNN, TF32 off: pydeform's GEMMs run in float32); on the CPU N=2,
  C=64 -> 64.
- deform_pool2d, 3x3, stride 2, pad 1, avg and max, with mask, on deform_conv2d's input shapes
  (GPU N=16, C=256, 64x64; CPU N=2, C=64, 64x64). avg mode's peer is the depthwise
  deform_conv2d with weight 1/9 that computes the same thing: torchvision's on the GPU,
  pydeform's own (Numba CPU) on the CPU.
"""

from __future__ import annotations

import numpy as np

from .common import (
    CPU_DTYPES, GPU_DTYPES, TORCHVISION, Calls, Case, PeerUnavailable, normal, require_torch, torch_autograd_calls,
    torch_dtype, uniform,
)

OPS = ("deform_conv_transpose2d", "deform_pool2d")
#: The input gradient of deform_pool2d scatters with float atomics on the GPU (both modes).
DETERMINISTIC_OPS = ("deform_pool2d",)
#: deform_conv_transpose2d's forward scatters (deform_conv2d's col2im), its backward does not.
DETERMINISTIC_FORWARD_OPS = ("deform_conv_transpose2d",)

_KERNEL_POINTS = 9  # 3x3
_TRANSPOSE_OPTIONS = {"stride": 2, "padding": 1, "output_padding": 1}
_POOL_OPTIONS = {"kernel_size": 3, "stride": 2, "padding": 1}


def _transpose_inputs(n, channels, out_channels, size, zero_offsets=False):
    """input [N, C, size, size] -> output [N, C_out, 2*size, 2*size]: offsets up to 2 pixels and
    a mask in (0, 1) on the input grid, or (``zero_offsets``) zero offsets and no mask."""

    def build(seed):
        rng = np.random.default_rng(seed)
        grid = (n, _KERNEL_POINTS, size, size)
        arrays = {
            "input": normal(rng, (n, channels, size, size)),
            "weight": normal(rng, (channels, out_channels, 3, 3)) / np.float32(np.sqrt(channels * _KERNEL_POINTS)),
            "bias": normal(rng, (out_channels,)),
        }
        if zero_offsets:
            arrays["offset"] = np.zeros((n, 2 * _KERNEL_POINTS, size, size), np.float32)
        else:
            arrays["offset"] = uniform(rng, -2.0, 2.0, (n, 2 * _KERNEL_POINTS, size, size))
            arrays["mask"] = uniform(rng, 0.0, 1.0, grid)
        arrays["grad_output"] = normal(rng, (n, out_channels, 2 * size, 2 * size))
        return arrays

    return build


def _pool_inputs(n, channels, size):
    """input [N, C, size, size] pooled 3x3 / 2 with pad 1 to size/2: offsets up to 2 pixels and a
    mask in (0, 1) on the output grid."""

    def build(seed):
        rng = np.random.default_rng(seed)
        out = size // 2
        return {
            "input": normal(rng, (n, channels, size, size)),
            "offset": uniform(rng, -2.0, 2.0, (n, 2 * _KERNEL_POINTS, out, out)),
            "mask": uniform(rng, 0.0, 1.0, (n, _KERNEL_POINTS, out, out)),
            "grad_output": normal(rng, (n, channels, out, out)),
        }

    return build


def _torch_conv_transpose_calls(case, host, dtype):
    """torch.nn.functional.conv_transpose2d on CUDA (the zero-offset case's input, weight, bias),
    its backward through autograd; cuDNN without TF32, like pydeform's float32 GEMMs."""
    torch = require_torch(cuda=True)
    tensors = {name: torch.from_numpy(host[name]).to("cuda", torch_dtype(torch, dtype))
               for name in ("input", "weight", "bias", "grad_output")}
    grad_output = tensors.pop("grad_output")
    differentiable = [tensor.requires_grad_() for tensor in tensors.values()]

    def output():
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return torch.nn.functional.conv_transpose2d(tensors["input"], tensors["weight"], tensors["bias"],
                                                        **case.options)

    return torch_autograd_calls(torch, output, differentiable, grad_output)


def _depthwise_weight(host):
    channels = host["input"].shape[1]
    return np.full((channels, 1, 3, 3), 1 / _KERNEL_POINTS, np.float32)


def _depthwise_torchvision_calls(case, host, dtype):
    """torchvision.ops.deform_conv2d with the depthwise weight 1/9 on CUDA: avg deform_pool2d's
    twin (bfloat16 under autocast, as for deform_conv2d's peer)."""
    torch = require_torch(cuda=True)
    try:
        import torchvision.ops
    except ImportError:
        raise PeerUnavailable("torchvision is not installed") from None
    tensor_dtype = torch_dtype(torch, dtype)
    tensors = {name: torch.from_numpy(array).to("cuda", tensor_dtype)
               for name, array in dict(host, weight=_depthwise_weight(host)).items()}
    grad_output = tensors.pop("grad_output")
    weight = tensors.pop("weight")
    differentiable = [tensors[name].requires_grad_() for name in ("input", "offset", "mask")]
    geometry = {"stride": case.options["stride"], "padding": case.options["padding"]}

    def output():
        with torch.autocast("cuda", dtype=tensor_dtype, enabled=dtype != "float32"):
            return torchvision.ops.deform_conv2d(tensors["input"], tensors["offset"], weight, mask=tensors["mask"],
                                                 **geometry)

    return torch_autograd_calls(torch, output, differentiable, grad_output)


def _depthwise_pydeform_calls(case, host, dtype):
    """pydeform.deform_conv2d (Numba CPU) with the depthwise weight 1/9: avg deform_pool2d's
    twin, the comparison of docs/benchmarks.md."""
    import pydeform

    arrays = {name: host[name].astype(dtype) for name in ("input", "offset", "mask")}
    weight = _depthwise_weight(host).astype(dtype)
    geometry = {"stride": case.options["stride"], "padding": case.options["padding"]}

    def forward():
        return pydeform.deform_conv2d(arrays["input"], arrays["offset"], weight, mask=arrays["mask"], **geometry)

    def forward_backward():
        forward()
        return pydeform.deform_conv2d_backward(host["grad_output"].astype(dtype), arrays["input"], arrays["offset"],
                                               weight, mask=arrays["mask"], **geometry)

    return Calls(forward, forward_backward)


def standard_cases():
    for device, (n, channels, out_channels), dtypes in (("gpu", (16, 256, 128), GPU_DTYPES),
                                                        ("cpu", (2, 64, 64), CPU_DTYPES)):
        shape = f"N={n}, C={channels} -> {out_channels}, 32x32 -> 64x64, 3x3, stride 2, pad 1, output_padding 1"
        yield Case("deform_conv_transpose2d", f"N{n}-C{channels}-{out_channels}-32x32", device, f"{shape}, with mask",
                   dtypes, _transpose_inputs(n, channels, out_channels, 32), _TRANSPOSE_OPTIONS, True, None)
        if device == "gpu":
            yield Case("deform_conv_transpose2d", f"N{n}-C{channels}-{out_channels}-32x32-zero-offsets", device,
                       f"{shape}, zero offsets, no mask", dtypes,
                       _transpose_inputs(n, channels, out_channels, 32, zero_offsets=True), _TRANSPOSE_OPTIONS, True,
                       "torch.nn.functional.conv_transpose2d (cuDNN, no TF32)",
                       peer_builder=_torch_conv_transpose_calls)
        n, channels = (16, 256) if device == "gpu" else (2, 64)
        for mode in ("avg", "max"):
            if mode == "max":
                peer, peer_builder = None, None
            elif device == "gpu":
                peer, peer_builder = TORCHVISION.format("deform_conv2d") + ", depthwise 1/9", _depthwise_torchvision_calls
            else:
                peer, peer_builder = "pydeform.deform_conv2d (Numba CPU), depthwise 1/9", _depthwise_pydeform_calls
            yield Case("deform_pool2d", f"N{n}-C{channels}-64x64-{mode}", device,
                       f"N={n}, C={channels}, 64x64 -> 32x32, 3x3, stride 2, pad 1, {mode}, with mask", dtypes,
                       _pool_inputs(n, channels, 64), dict(_POOL_OPTIONS, mode=mode), True, peer,
                       peer_builder=peer_builder)
