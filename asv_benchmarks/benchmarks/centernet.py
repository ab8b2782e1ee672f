"""The CenterNet ops on the standard shape (pydeform.benchmark_cases): 80 classes on a 128x128
map (COCO at 512x512, stride 4), B=8 on the GPU (float32 and bfloat16) and B=2 on the CPU.
centernet_decode (K=100) runs beside the PyTorch decode (max_pool2d, eq, topk, topk, gather) on
both; its achieved fraction of the bandwidth floor on the GPU (the heatmap read once) is
floors.BandwidthFloorGpu's. centernet_targets and centernet_focal_loss have no peer."""

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class CenterNetDecodeGpu(_GpuOp):
    op = "centernet_decode"
    params = gpu_params(op)


class CenterNetDecodeCpu(_CpuOp):
    op = "centernet_decode"
    params = cpu_params(op)


class CenterNetTargetsGpu(_GpuOp):
    op = "centernet_targets"
    params = gpu_params(op)


class CenterNetTargetsCpu(_CpuOp):
    op = "centernet_targets"
    params = cpu_params(op)


class CenterNetFocalLossGpu(_GpuOp):
    op = "centernet_focal_loss"
    params = gpu_params(op)


class CenterNetFocalLossCpu(_CpuOp):
    op = "centernet_focal_loss"
    params = cpu_params(op)
