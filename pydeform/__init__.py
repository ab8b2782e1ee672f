"""pydeform: GPU kernels for deformable and region-based vision operators.

Every op runs on CuPy arrays (CuPy RawKernels by default, ``backend="numba"`` for the Numba
CUDA kernels) and on NumPy arrays (Numba CPU kernels), with an analytic backward pass.
Importing pydeform compiles nothing and needs neither CuPy nor a GPU.
"""

from .centernet import (
    CenterNetTargets,
    centernet_decode,
    centernet_focal_loss,
    centernet_focal_loss_backward,
    centernet_targets,
)
from .deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from .deform_unet import (
    DeformConvTranspose2dGrads,
    DeformPool2dGrads,
    deform_conv_transpose2d,
    deform_conv_transpose2d_backward,
    deform_pool2d,
    deform_pool2d_backward,
)
from .roi import (
    DeformPSRoIPoolGrads,
    DeformRoIPoolGrads,
    RoIGrads,
    deform_psroi_pool,
    deform_psroi_pool_backward,
    deform_roi_pool,
    deform_roi_pool_backward,
    ps_roi_align,
    ps_roi_align_backward,
    ps_roi_pool,
    ps_roi_pool_backward,
    roi_align,
    roi_align_backward,
    roi_pool,
    roi_pool_backward,
)
from .semiconv import (
    AffinityGrads,
    HoughPeaks,
    InstanceMeans,
    SeededMaskGrads,
    affinity,
    affinity_backward,
    assign_to_centers,
    hough_peaks,
    hough_votes,
    instance_mean_loss,
    instance_mean_loss_backward,
    instance_means,
    seeded_mask_logits,
    seeded_mask_logits_backward,
    semiconv_embed,
)

__version__ = "0.1.0"

__all__ = [
    "CenterNetTargets",
    "centernet_decode",
    "centernet_focal_loss",
    "centernet_focal_loss_backward",
    "centernet_targets",
    "DeformConv2dGrads",
    "DeformConvTranspose2dGrads",
    "DeformPool2dGrads",
    "DeformPSRoIPoolGrads",
    "DeformRoIPoolGrads",
    "RoIGrads",
    "__version__",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_conv_transpose2d",
    "deform_conv_transpose2d_backward",
    "deform_pool2d",
    "deform_pool2d_backward",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "roi_align",
    "roi_align_backward",
    "roi_pool",
    "roi_pool_backward",
    "AffinityGrads",
    "HoughPeaks",
    "InstanceMeans",
    "SeededMaskGrads",
    "affinity",
    "affinity_backward",
    "assign_to_centers",
    "hough_peaks",
    "hough_votes",
    "instance_mean_loss",
    "instance_mean_loss_backward",
    "instance_means",
    "seeded_mask_logits",
    "seeded_mask_logits_backward",
    "semiconv_embed",
]
