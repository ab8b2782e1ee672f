"""The CenterNet ops on the standard shape (pydeform.benchmark_cases): 80 classes on a 128x128
map (COCO at 512x512, stride 4), B=8 on the GPU (float32 and bfloat16) and B=2 on the CPU.
centernet_decode (K=100) runs beside the PyTorch decode (max_pool2d, eq, topk, topk, gather) on
both; on the GPU its achieved fraction of the bandwidth floor (the heatmap read once at the
measured copy bandwidth) is tracked too. centernet_targets and centernet_focal_loss have no peer."""

from pydeform import benchmark_cases as cases_module

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class CenterNetDecodeGpu(_GpuOp):
    op = "centernet_decode"
    params = gpu_params(op)

    def track_fraction_of_bandwidth_floor(self, name, dtype, direction, implementation):
        """Floor time (heatmap bytes / measured device copy bandwidth) / measured time: 1 is the
        heatmap read once at full bandwidth."""
        floor_seconds = cases_module.floor_bytes(self.case, dtype) / cases_module.copy_bandwidth(self.cupy)
        return floor_seconds * 1e3 / self.median_ms()

    track_fraction_of_bandwidth_floor.unit = "fraction"


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
