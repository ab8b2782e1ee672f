"""The Deformable U-Net ops on the standard shapes (pydeform.benchmark_cases): deform_conv_transpose2d
(3x3, stride 2, 32x32 -> 64x64; GPU N=16, C=256 -> 128, with a zero-offset twin beside torch's
conv_transpose2d; CPU N=2, C=64 -> 64) and deform_pool2d (3x3, stride 2, avg and max, on 64x64;
avg beside the depthwise deform_conv2d computing the same thing), GPU float32 and bfloat16 on
both pydeform backends, CPU float32."""

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class DeformConvTranspose2dGpu(_GpuOp):
    op = "deform_conv_transpose2d"
    params = gpu_params(op)


class DeformConvTranspose2dCpu(_CpuOp):
    op = "deform_conv_transpose2d"
    params = cpu_params(op)


class DeformPool2dGpu(_GpuOp):
    op = "deform_pool2d"
    params = gpu_params(op)


class DeformPool2dCpu(_CpuOp):
    op = "deform_pool2d"
    params = cpu_params(op)
