"""Pure-NumPy float64 oracle for pydeform's kernels (the formulas of docs/); imports nothing from pydeform."""

from .deform_conv import deform_conv2d, deform_conv2d_backward
from .deform_psroi_pool import deform_psroi_pool, deform_psroi_pool_backward
from .roi_align import (
    deform_roi_pool,
    deform_roi_pool_backward,
    ps_roi_align,
    ps_roi_align_backward,
    roi_align,
    roi_align_backward,
)
from .roi_pool import ps_roi_pool, ps_roi_pool_backward, roi_pool, roi_pool_backward

__all__ = ["deform_conv2d", "deform_conv2d_backward"]
__all__ += [
    "roi_align", "roi_align_backward", "roi_pool", "roi_pool_backward",
    "ps_roi_align", "ps_roi_align_backward", "ps_roi_pool", "ps_roi_pool_backward",
    "deform_roi_pool", "deform_roi_pool_backward", "deform_psroi_pool",
    "deform_psroi_pool_backward",
]
from .centernet import (  # noqa: E402
    centernet_decode,
    centernet_focal_loss,
    centernet_focal_loss_backward,
    centernet_targets,
)

__all__ += ["centernet_decode", "centernet_focal_loss", "centernet_focal_loss_backward", "centernet_targets"]
from .deform_unet import (  # noqa: E402
    deform_conv_transpose2d,
    deform_conv_transpose2d_backward,
    deform_pool2d,
    deform_pool2d_backward,
)

__all__ += ["deform_conv_transpose2d", "deform_conv_transpose2d_backward", "deform_pool2d", "deform_pool2d_backward"]
from .semiconv import (  # noqa: E402
    affinity,
    affinity_backward,
    assign_to_centers,
    hough_votes,
    instance_mean_loss,
    instance_mean_loss_backward,
    instance_means,
    seeded_mask_logits,
    seeded_mask_logits_backward,
    semiconv_embed,
)

__all__ += [
    "semiconv_embed", "instance_means", "instance_mean_loss", "instance_mean_loss_backward", "affinity",
    "affinity_backward", "seeded_mask_logits", "seeded_mask_logits_backward", "hough_votes", "assign_to_centers",
]
