"""CuPy RawKernel kernel set of the RoI family (kernels in ``roi.cu``); the interface is the one
:mod:`pydeform.roi` documents.

The ``*_launch`` functions marshal one kernel's arguments in the exact order and widths of its
CUDA signature: sizes and integer parameters ``long long``, flags ``int``, float parameters
(spatial_scale, gamma, trans_std) in the accumulation type (float32 for float32 / float16 /
bfloat16 storage, float64 for float64). Each returns ``(template, n_items, args)`` with one work
item per output element; the kernel set and the tests' CPU host shim both launch through them.
"""

import numpy as np

from ..._arrays import accumulation_dtype
from ._compile import KernelManifest, launch

KERNELS = KernelManifest(
    source="roi.cu",
    templates=(
        "roi_align_forward",
        "roi_align_backward",
        "roi_pool_forward",
        "roi_pool_backward",
        "deform_roi_pool_forward",
        "deform_roi_pool_backward",
        "deform_psroi_pool_forward",
        "deform_psroi_pool_backward",
    ),
)


def _geometry_args(input, channels_out, pooled_h, pooled_w):
    """PYDEFORM_ROI_GEOMETRY_PARAMS of roi.cu, all ``long long``."""
    batch, channels, height, width = input.shape
    return tuple(np.int64(v) for v in (batch, channels, height, width, pooled_h, pooled_w, channels_out))


def _acc(input, value):
    """A float parameter in the accumulation type of ``input``'s storage dtype."""
    return accumulation_dtype(input.dtype).type(value)


def _flag(value):
    return np.int32(bool(value))


def _roi_align_args(input, p):
    """Geometry and PYDEFORM_ROI_ALIGN_PARAMS."""
    return (
        *_geometry_args(input, p.channels_out, p.pooled_h, p.pooled_w),
        _acc(input, p.spatial_scale), np.int64(p.sampling_ratio), _flag(p.aligned),
        _flag(p.max_mode), _flag(p.position_sensitive),
    )


def _roi_pool_args(input, p):
    """Geometry and PYDEFORM_ROI_POOL_PARAMS."""
    return (
        *_geometry_args(input, p.channels_out, p.pooled_h, p.pooled_w),
        _acc(input, p.spatial_scale), _flag(p.position_sensitive),
    )


def _deform_roi_pool_args(input, p):
    """Geometry and PYDEFORM_DEFORM_ROI_POOL_PARAMS."""
    return (
        *_geometry_args(input, p.channels, p.pooled_h, p.pooled_w),
        _acc(input, p.spatial_scale), np.int64(p.sampling_ratio), _acc(input, p.gamma),
        _flag(p.has_offset), _flag(p.has_mask),
    )


def _deform_psroi_pool_args(input, p):
    """Geometry and PYDEFORM_DEFORM_PSROI_POOL_PARAMS."""
    return (
        *_geometry_args(input, p.output_dim, p.pooled_size, p.pooled_size),
        np.int64(p.group_size), np.int64(p.part_size), np.int64(p.sample_per_part),
        np.int64(p.num_classes), _acc(input, p.spatial_scale), _acc(input, p.trans_std),
        _flag(p.has_trans),
    )


def _work(template, n_items, *args):
    """The launch of ``template`` over ``n_items`` output elements, whose first argument is that count."""
    return template, n_items, (np.int64(n_items), *args)


def roi_align_forward_launch(input, rois, output, params):
    return _work("roi_align_forward", output.size, input, rois, output, *_roi_align_args(input, params))


def roi_align_backward_launch(grad_output, input, rois, grad_input, params):
    return _work("roi_align_backward", grad_output.size, grad_output, input, rois, grad_input,
                 *_roi_align_args(input, params))


def roi_pool_forward_launch(input, rois, output, params):
    return _work("roi_pool_forward", output.size, input, rois, output, *_roi_pool_args(input, params))


def roi_pool_backward_launch(grad_output, input, rois, grad_input, params):
    return _work("roi_pool_backward", grad_output.size, grad_output, input, rois, grad_input,
                 *_roi_pool_args(input, params))


def deform_roi_pool_forward_launch(input, rois, offset, mask, output, params):
    """offset / mask may be None (null pointers; params says which are present)."""
    return _work("deform_roi_pool_forward", output.size, input, rois, offset, mask, output,
                 *_deform_roi_pool_args(input, params))


def deform_roi_pool_backward_launch(grad_output, input, rois, offset, mask, grad_input, grad_offset, grad_mask,
                                    params):
    """grad_offset / grad_mask are None exactly when offset / mask are."""
    return _work("deform_roi_pool_backward", grad_output.size, grad_output, input, rois, offset, mask, grad_input,
                 grad_offset, grad_mask, *_deform_roi_pool_args(input, params))


def deform_psroi_pool_forward_launch(input, rois, trans, output, params):
    """trans may be None (a null pointer; params.has_trans says so)."""
    return _work("deform_psroi_pool_forward", output.size, input, rois, trans, output,
                 *_deform_psroi_pool_args(input, params))


def deform_psroi_pool_backward_launch(grad_output, input, rois, trans, grad_input, grad_trans, params):
    """grad_trans is None exactly when trans is."""
    return _work("deform_psroi_pool_backward", grad_output.size, grad_output, input, rois, trans, grad_input,
                 grad_trans, *_deform_psroi_pool_args(input, params))


class CupyRoIKernels:
    """The RoI kernel set on CuPy arrays (C-contiguous, on the current device)."""

    @staticmethod
    def workspace(family: str, params, shapes: dict, dtype, *, backward: bool) -> dict:
        """No scratch of its own: the kernels read and write every storage type directly."""
        return {}

    @property
    def xp(self):
        import cupy

        return cupy

    def roi_align_forward(self, input, rois, output, params):
        self._launch(input.dtype, *roi_align_forward_launch(input, rois, output, params))

    def roi_align_backward(self, grad_output, input, rois, grad_input, params):
        self._launch(input.dtype, *roi_align_backward_launch(grad_output, input, rois, grad_input, params))

    def roi_pool_forward(self, input, rois, output, params):
        self._launch(input.dtype, *roi_pool_forward_launch(input, rois, output, params))

    def roi_pool_backward(self, grad_output, input, rois, grad_input, params):
        self._launch(input.dtype, *roi_pool_backward_launch(grad_output, input, rois, grad_input, params))

    def deform_roi_pool_forward(self, input, rois, offset, mask, output, params):
        self._launch(input.dtype, *deform_roi_pool_forward_launch(input, rois, offset, mask, output, params))

    def deform_roi_pool_backward(self, grad_output, input, rois, offset, mask, grad_input, grad_offset, grad_mask,
                                 params):
        self._launch(input.dtype, *deform_roi_pool_backward_launch(
            grad_output, input, rois, offset, mask, grad_input, grad_offset, grad_mask, params))

    def deform_psroi_pool_forward(self, input, rois, trans, output, params):
        self._launch(input.dtype, *deform_psroi_pool_forward_launch(input, rois, trans, output, params))

    def deform_psroi_pool_backward(self, grad_output, input, rois, trans, grad_input, grad_trans, params):
        self._launch(input.dtype, *deform_psroi_pool_backward_launch(
            grad_output, input, rois, trans, grad_input, grad_trans, params))

    def _launch(self, storage_dtype, template, n_items, args):
        launch(KERNELS, template, storage_dtype, n_items, args)
