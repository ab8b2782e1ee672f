"""The semi-convolutional ops on the standard shapes (pydeform.benchmark_cases): N=8 embeddings
of 256x256 with D=8 channels and K=32 instances, GPU float32 and bfloat16 on both pydeform
backends, CPU float32. instance_mean_loss forward + backward runs beside the same loss in
PyTorch ops (index_add, autograd) on both devices; the other ops have no peer."""

from .common import _CpuOp, _GpuOp, cpu_params, gpu_params


class SemiConvEmbedGpu(_GpuOp):
    op = "semiconv_embed"
    params = gpu_params(op)


class SemiConvEmbedCpu(_CpuOp):
    op = "semiconv_embed"
    params = cpu_params(op)


class InstanceMeansGpu(_GpuOp):
    op = "instance_means"
    params = gpu_params(op)


class InstanceMeansCpu(_CpuOp):
    op = "instance_means"
    params = cpu_params(op)


class InstanceMeanLossGpu(_GpuOp):
    op = "instance_mean_loss"
    params = gpu_params(op)


class InstanceMeanLossCpu(_CpuOp):
    op = "instance_mean_loss"
    params = cpu_params(op)


class AffinityGpu(_GpuOp):
    op = "affinity"
    params = gpu_params(op)


class AffinityCpu(_CpuOp):
    op = "affinity"
    params = cpu_params(op)


class SeededMaskLogitsGpu(_GpuOp):
    op = "seeded_mask_logits"
    params = gpu_params(op)


class SeededMaskLogitsCpu(_CpuOp):
    op = "seeded_mask_logits"
    params = cpu_params(op)


class HoughVotesGpu(_GpuOp):
    op = "hough_votes"
    params = gpu_params(op)


class HoughVotesCpu(_CpuOp):
    op = "hough_votes"
    params = cpu_params(op)


class HoughPeaksGpu(_GpuOp):
    op = "hough_peaks"
    params = gpu_params(op)


class HoughPeaksCpu(_CpuOp):
    op = "hough_peaks"
    params = cpu_params(op)


class AssignToCentersGpu(_GpuOp):
    op = "assign_to_centers"
    params = gpu_params(op)


class AssignToCentersCpu(_CpuOp):
    op = "assign_to_centers"
    params = cpu_params(op)
