"""CuPy RawKernel kernel set of deform_conv2d (kernels in ``deform_conv.cu``).

The ``*_launch`` functions marshal one kernel's arguments in the exact order and integer widths
of its CUDA signature; the kernel set and the tests' CPU host shim both launch through them.
"""

import numpy as np

from ..._arrays import accumulation_dtype
from ..._contributions import col2im_buckets, col2im_capacity, col2im_lists_plan, contribution_lists
from ._compile import KernelManifest, launch
from .contributions import SORT_TEMPLATE, sort_launch

KERNELS = KernelManifest(
    source="deform_conv.cu",
    templates=(
        "deform_conv2d_im2col",
        "deform_conv2d_col2im_coord",
        "deform_conv2d_col2im",
        "deform_conv2d_col2im_count",
        "deform_conv2d_col2im_fill",
        SORT_TEMPLATE,
        "deform_conv2d_col2im_gather",
    ),
)


def _work_items(batch, geom):
    """One work item per (b, g, i, j, y, x)."""
    return batch * geom.offset_groups * geom.kernel_h * geom.kernel_w * geom.out_h * geom.out_w


def _geometry_args(geom):
    """PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS of deform_conv.cu, all ``long long``."""
    return tuple(
        np.int64(value)
        for value in (
            geom.in_channels,
            geom.height,
            geom.width,
            geom.kernel_h,
            geom.kernel_w,
            geom.stride_h,
            geom.stride_w,
            geom.pad_h,
            geom.pad_w,
            geom.dilation_h,
            geom.dilation_w,
            geom.offset_groups,
            geom.out_h,
            geom.out_w,
        )
    )


def _mask_args(mask):
    """``const T* mask, int has_mask``: a null pointer and 0 for DCNv1."""
    return (mask, np.int32(mask is not None))


def im2col_launch(input, offset, mask, columns, geom):
    n_items = _work_items(input.shape[0], geom)
    args = (np.int64(n_items), input, offset, *_mask_args(mask), columns, *_geometry_args(geom))
    return "deform_conv2d_im2col", n_items, args


def col2im_coord_launch(input, offset, mask, grad_columns, grad_offset, grad_mask, geom):
    n_items = _work_items(input.shape[0], geom)
    args = (
        np.int64(n_items),
        input,
        offset,
        *_mask_args(mask),
        grad_columns,
        grad_offset,
        grad_mask,
        *_geometry_args(geom),
    )
    return "deform_conv2d_col2im_coord", n_items, args


def col2im_launch(offset, mask, grad_columns, grad_input, geom):
    n_items = _work_items(offset.shape[0], geom)
    args = (
        np.int64(n_items),
        offset,
        *_mask_args(mask),
        grad_columns,
        grad_input,
        *_geometry_args(geom),
    )
    return "deform_conv2d_col2im", n_items, args


def col2im_count_launch(offset, mask, bucket_counts, geom):
    n_items = _work_items(offset.shape[0], geom)
    args = (np.int64(n_items), offset, *_mask_args(mask), bucket_counts, *_geometry_args(geom))
    return "deform_conv2d_col2im_count", n_items, args


def col2im_fill_launch(offset, mask, cursors, item, local, weight, geom):
    n_items = _work_items(offset.shape[0], geom)
    args = (np.int64(n_items), offset, *_mask_args(mask), cursors, item, local, weight, *_geometry_args(geom))
    return "deform_conv2d_col2im_fill", n_items, args


def col2im_gather_launch(bucket_ends, item, weight, grad_columns, grad_input, geom):
    n_items = grad_input.size
    args = (np.int64(n_items), bucket_ends, item, weight, grad_columns, grad_input, *_geometry_args(geom))
    return "deform_conv2d_col2im_gather", n_items, args


class CupyDeformConv2dKernels:
    """The deform_conv2d kernel set on CuPy arrays (C-contiguous, on the current device)."""

    direct_forward = False

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """No scratch of its own: the kernels read and write every storage type directly."""
        return {}

    @staticmethod
    def col2im_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """The contribution lists of :meth:`col2im_deterministic` on ``batch`` images."""
        return col2im_lists_plan(batch, geometry, dtype)

    @property
    def xp(self):
        import cupy

        return cupy

    def im2col(self, input, offset, mask, columns, geom):
        self._launch(input.dtype, *im2col_launch(input, offset, mask, columns, geom))

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geom):
        self._launch(
            input.dtype,
            *col2im_coord_launch(input, offset, mask, grad_columns, grad_offset, grad_mask, geom),
        )

    def col2im(self, offset, mask, grad_columns, grad_input, geom):
        self._launch(offset.dtype, *col2im_launch(offset, mask, grad_columns, grad_input, geom))

    def col2im_deterministic(self, offset, mask, grad_columns, grad_input, geom):
        """col2im by sorted contribution lists (:mod:`pydeform._contributions`): the same sums
        in an order the inputs fix, bit-identical run to run; writes every grad_input element."""
        lists = self.col2im_contribution_lists(offset, mask, geom)
        self._launch(offset.dtype, *col2im_gather_launch(lists.bucket_ends, lists.item, lists.weight, grad_columns,
                                                         grad_input, geom))

    def col2im_contribution_lists(self, offset, mask, geom):
        """The sorted contribution lists of col2im's scatter (buckets ``(b*Goff + g)*H*W + pixel``,
        items the work items ``(b, g, i, j, y, x)``, weights m * corner weight): they depend on
        the offsets and mask only, so deform_pool2d's deterministic input gradient reuses them."""
        dtype, batch = offset.dtype, offset.shape[0]
        return contribution_lists(
            self.xp, col2im_buckets(batch, geom), col2im_capacity(batch, geom), accumulation_dtype(dtype),
            lambda counts: self._launch(dtype, *col2im_count_launch(offset, mask, counts, geom)),
            lambda cursors, *entries: self._launch(dtype, *col2im_fill_launch(offset, mask, cursors, *entries, geom)),
            lambda ends, *entries: self._launch(dtype, *sort_launch(ends, *entries)),
        )

    def _launch(self, storage_dtype, template, n_items, args):
        launch(KERNELS, template, storage_dtype, n_items, args)
