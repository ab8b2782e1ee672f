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
from ..._contributions import contribution_lists, roi_contribution_layout, roi_lists_plan, roi_param_partials_shape
from ..._workspace import scratch
from ._compile import KernelManifest, launch
from .contributions import SORT_TEMPLATE, sort_launch

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
        "roi_align_backward_lists",
        "roi_align_backward_gather",
        "roi_pool_backward_lists",
        "roi_pool_backward_gather",
        "deform_roi_pool_backward_lists",
        "deform_roi_pool_backward_gather",
        "deform_roi_pool_backward_partials",
        "deform_roi_pool_backward_params_sum",
        "deform_psroi_pool_backward_lists",
        "deform_psroi_pool_backward_gather",
        "deform_psroi_pool_backward_partials",
        "deform_psroi_pool_backward_params_sum",
        SORT_TEMPLATE,
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


# The deterministic backward (roi.cu's *_lists / *_gather kernels, pydeform/_contributions.py).


# The arrays each family's *_lists kernel reads before the cursors, and the arguments after
# its fill flag (the geometry and the op's parameters).
def _list_arrays(family, input, rois, optional):
    return (input, rois) if family in ("roi_align", "roi_pool") else (rois, *optional)


_PARAMS_ARGS = {
    "roi_align": _roi_align_args,
    "roi_pool": _roi_pool_args,
    "deform_roi_pool": _deform_roi_pool_args,
    "deform_psroi_pool": _deform_psroi_pool_args,
}


def backward_lists_launch(family, arrays, cursors, item, local, weight, fill, input, params, layout):
    """Counts (``fill`` False; ``item`` / ``local`` / ``weight`` None) or stores the contributions."""
    return _work(f"{family}_backward_lists", layout.position_items, *arrays, cursors, item, local, weight,
                 _flag(fill), *_PARAMS_ARGS[family](input, params))


def backward_gather_launch(family, lists, grad_output, grad_input, input, params):
    if family in ("roi_align", "roi_pool"):
        tail = _PARAMS_ARGS[family](input, params)
    elif family == "deform_roi_pool":
        tail = _geometry_args(input, params.channels, params.pooled_h, params.pooled_w)
    else:
        tail = (*_geometry_args(input, params.output_dim, params.pooled_size, params.pooled_size),
                np.int64(params.group_size), np.int64(params.num_classes))
    return _work(f"{family}_backward_gather", grad_input.size, lists.bucket_ends, lists.item, lists.weight,
                 grad_output, grad_input, *tail)


def backward_partials_launch(family, grad_output, input, rois, optional, partials, params):
    return _work(f"{family}_backward_partials", grad_output.size, grad_output, input, rois, *optional, partials,
                 *_PARAMS_ARGS[family](input, params))


def backward_params_sum_launch(family, partials, grads, input, params):
    """``grads``: (grad_offset, grad_mask) or (grad_trans,); one work item per gradient element
    (deform_roi_pool: per (k, x|y|mask, bin), whether or not offset / mask are present)."""
    if family == "deform_roi_pool":
        n_items = partials.shape[1] // params.channels * 3
    else:
        n_items = grads[0].size
    return _work(f"{family}_backward_params_sum", n_items, partials, *grads, *_PARAMS_ARGS[family](input, params))


class CupyRoIKernels:
    """The RoI kernel set on CuPy arrays (C-contiguous, on the current device)."""

    @staticmethod
    def workspace(family: str, params, shapes: dict, dtype, *, backward: bool) -> dict:
        """No scratch of its own: the kernels read and write every storage type directly."""
        return {}

    @staticmethod
    def deterministic_workspace(family: str, params, shapes: dict, dtype) -> dict:
        """The scratch of the ``*_backward_deterministic`` method of ``family`` (``shapes`` as
        for :meth:`workspace`); raises ValueError where its size depends on the boxes."""
        return roi_lists_plan(family, params, shapes, dtype)

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

    def roi_align_backward_deterministic(self, grad_output, input, rois, grad_input, params):
        self._deterministic_input_grad("roi_align", (), grad_output, input, rois, grad_input, params)

    def roi_pool_backward_deterministic(self, grad_output, input, rois, grad_input, params):
        self._deterministic_input_grad("roi_pool", (), grad_output, input, rois, grad_input, params)

    def deform_roi_pool_backward_deterministic(self, grad_output, input, rois, offset, mask, grad_input, grad_offset,
                                               grad_mask, params):
        optional = (offset, mask)
        self._deterministic_input_grad("deform_roi_pool", optional, grad_output, input, rois, grad_input, params)
        if offset is not None or mask is not None:
            self._deterministic_params_grad("deform_roi_pool", optional, (grad_offset, grad_mask), grad_output, input,
                                            rois, params)

    def deform_psroi_pool_backward_deterministic(self, grad_output, input, rois, trans, grad_input, grad_trans,
                                                 params):
        self._deterministic_input_grad("deform_psroi_pool", (trans,), grad_output, input, rois, grad_input, params)
        if trans is not None:
            self._deterministic_params_grad("deform_psroi_pool", (trans,), (grad_trans,), grad_output, input, rois,
                                            params)

    def _deterministic_input_grad(self, family, optional, grad_output, input, rois, grad_input, params):
        """grad_input (every element written) from sorted contribution lists."""
        dtype = input.dtype
        layout = roi_contribution_layout(family, input.shape, rois.shape[0], params)
        arrays = _list_arrays(family, input, rois, optional)

        def lists_step(cursors, item, local, weight, fill):
            self._launch(dtype, *backward_lists_launch(family, arrays, cursors, item, local, weight, fill, input,
                                                       params, layout))

        lists = contribution_lists(
            self.xp, layout.buckets, layout.capacity, accumulation_dtype(dtype),
            lambda counts: lists_step(counts, None, None, None, False),
            lambda cursors, *entries: lists_step(cursors, *entries, True),
            lambda ends, *entries: self._launch(dtype, *sort_launch(ends, *entries)),
        )
        self._launch(dtype, *backward_gather_launch(family, lists, grad_output, grad_input, input, params))

    def _deterministic_params_grad(self, family, optional, grads, grad_output, input, rois, params):
        """The offset / mask / trans gradients: each output element's share written to partials,
        then summed per gradient element in a fixed order (every element written)."""
        dtype = input.dtype
        partials = scratch(self.xp, "param_partials", roi_param_partials_shape(family, grad_output.size),
                           accumulation_dtype(dtype))
        self._launch(dtype, *backward_partials_launch(family, grad_output, input, rois, optional, partials, params))
        self._launch(dtype, *backward_params_sum_launch(family, partials, grads, input, params))

    def _launch(self, storage_dtype, template, n_items, args):
        launch(KERNELS, template, storage_dtype, n_items, args)
