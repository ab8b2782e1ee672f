"""The RoI ops on the standard shapes (pydeform.benchmark_cases): on the GPU 512 rois of 16..400
px on N=2, C=256, 200x304 (stride 4), 7x7 and 14x14 outputs (the deformable pools at 7x7),
float32 and bfloat16, beside torchvision.ops (bfloat16 under autocast); on the CPU 256 rois on
N=1, C=64, 100x152, 7x7, beside ONNX Runtime's RoiAlign and MaxRoiPool (forward only).
ps_roi_*, deform_roi_pool and deform_psroi_pool have no CPU peer, the deformable pools no GPU peer."""

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class RoIAlignGpu(_GpuOp):
    op = "roi_align"
    params = gpu_params(op)


class RoIAlignCpu(_CpuOp):
    op = "roi_align"
    params = cpu_params(op)


class RoIPoolGpu(_GpuOp):
    op = "roi_pool"
    params = gpu_params(op)


class RoIPoolCpu(_CpuOp):
    op = "roi_pool"
    params = cpu_params(op)


class PSRoIAlignGpu(_GpuOp):
    op = "ps_roi_align"
    params = gpu_params(op)


class PSRoIAlignCpu(_CpuOp):
    op = "ps_roi_align"
    params = cpu_params(op)


class PSRoIPoolGpu(_GpuOp):
    op = "ps_roi_pool"
    params = gpu_params(op)


class PSRoIPoolCpu(_CpuOp):
    op = "ps_roi_pool"
    params = cpu_params(op)


class DeformRoIPoolGpu(_GpuOp):
    op = "deform_roi_pool"
    params = gpu_params(op)


class DeformRoIPoolCpu(_CpuOp):
    op = "deform_roi_pool"
    params = cpu_params(op)


class DeformPSRoIPoolGpu(_GpuOp):
    op = "deform_psroi_pool"
    params = gpu_params(op)


class DeformPSRoIPoolCpu(_CpuOp):
    op = "deform_psroi_pool"
    params = cpu_params(op)
