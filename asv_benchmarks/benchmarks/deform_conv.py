"""deform_conv2d on the standard shapes (pydeform.benchmark_cases): on the GPU the DCNv2 layers
(N=16, C=256 -> 256, 64x64; N=8, C=64 -> 64, 128x128) and DCNv4's shapes, float32 and bfloat16,
CuPy and Numba CUDA backends beside torchvision.ops.deform_conv2d (bfloat16 under autocast);
on the CPU N=2, C=64 -> 64, 64x64 beside ONNX Runtime's DeformConv (forward only)."""

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class DeformConv2dGpu(_GpuOp):
    op = "deform_conv2d"
    params = gpu_params(op)


class DeformConv2dCpu(_CpuOp):
    op = "deform_conv2d"
    params = cpu_params(op)
