"""CuPy RawKernel kernel set of deform_pool2d (kernels in ``deform_pool.cu``); the interface is
the one :mod:`pydeform.deform_unet` documents.

The ``*_launch`` functions marshal one kernel's arguments in the exact order and integer widths
of its CUDA signature; the kernel set and the tests' CPU host shim both launch through them.
"""

import numpy as np

from ...deform_unet import depthwise_geometry
from ._compile import KernelManifest, launch
from .deform_conv import CupyDeformConv2dKernels

KERNELS = KernelManifest(
    source="deform_pool.cu",
    templates=(
        "deform_pool2d_forward",
        "deform_pool2d_backward_input",
        "deform_pool2d_backward_coord",
        "deform_pool2d_backward_input_gather",
    ),
)


def _geometry_args(geom):
    """PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS of deform_pool.cu, all ``long long``, in the field
    order of DeformPool2dGeometry."""
    return tuple(np.int64(value) for value in geom)


def _optional(array):
    """``const T* array, int has_array``: a null pointer and 0 when absent."""
    return (array, np.int32(array is not None))


def _elements(batch, geom):
    """One work item per output element (b, c, y, x)."""
    return batch * geom.channels * geom.out_h * geom.out_w


def forward_launch(input, offset, mask, output, indices, geom, max_mode):
    n_items = _elements(input.shape[0], geom)
    args = (np.int64(n_items), input, offset, *_optional(mask), output, *_optional(indices), np.int32(max_mode),
            *_geometry_args(geom))
    return "deform_pool2d_forward", n_items, args


def backward_input_launch(offset, mask, grad_output, indices, grad_input, geom, max_mode):
    n_items = _elements(offset.shape[0], geom)
    args = (np.int64(n_items), offset, *_optional(mask), grad_output, indices, np.int32(max_mode), grad_input,
            *_geometry_args(geom))
    return "deform_pool2d_backward_input", n_items, args


def backward_coord_launch(input, offset, mask, grad_output, indices, grad_offset, grad_mask, geom, max_mode):
    # One work item per sample (b, g, k, y, x).
    n_items = input.shape[0] * geom.offset_groups * geom.kernel_h * geom.kernel_w * geom.out_h * geom.out_w
    args = (np.int64(n_items), input, offset, *_optional(mask), grad_output, indices, np.int32(max_mode),
            grad_offset, grad_mask, *_geometry_args(geom))
    return "deform_pool2d_backward_coord", n_items, args


def backward_input_gather_launch(bucket_ends, item, weight, grad_output, indices, grad_input, geom, max_mode):
    n_items = grad_input.size
    args = (np.int64(n_items), bucket_ends, item, weight, grad_output, indices, np.int32(max_mode), grad_input,
            *_geometry_args(geom))
    return "deform_pool2d_backward_input_gather", n_items, args


class CupyDeformPool2dKernels:
    """The deform_pool2d kernel set on CuPy arrays (C-contiguous, on the current device)."""

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """No scratch of its own: the kernels read and write every storage type directly."""
        return {}

    @property
    def xp(self):
        import cupy

        return cupy

    def forward(self, input, offset, mask, output, indices, geom, max_mode):
        self._launch(input.dtype, *forward_launch(input, offset, mask, output, indices, geom, max_mode))

    def backward_input(self, offset, mask, grad_output, indices, grad_input, geom, max_mode):
        self._launch(offset.dtype,
                     *backward_input_launch(offset, mask, grad_output, indices, grad_input, geom, max_mode))

    def backward_coord(self, input, offset, mask, grad_output, indices, grad_offset, grad_mask, geom, max_mode):
        self._launch(input.dtype, *backward_coord_launch(
            input, offset, mask, grad_output, indices, grad_offset, grad_mask, geom, max_mode))

    @staticmethod
    def backward_input_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """The contribution lists of :meth:`backward_input_deterministic` on ``batch`` images."""
        return CupyDeformConv2dKernels.col2im_deterministic_workspace(batch, depthwise_geometry(geometry), dtype)

    def backward_input_deterministic(self, offset, mask, grad_output, indices, grad_input, geom, max_mode):
        """:meth:`backward_input` by sorted contribution lists (deform_conv2d's deterministic
        col2im lists on the same samples, then a gather per grad_input element): bit-identical
        run to run; writes every grad_input element."""
        lists = self._deform_conv_kernels().col2im_contribution_lists(offset, mask, depthwise_geometry(geom))
        self._launch(offset.dtype, *backward_input_gather_launch(
            lists.bucket_ends, lists.item, lists.weight, grad_output, indices, grad_input, geom, max_mode))

    @staticmethod
    def _deform_conv_kernels():
        """The deform_conv2d kernel set whose contribution lists the deterministic backward uses."""
        return CupyDeformConv2dKernels()

    def _launch(self, storage_dtype, template, n_items, args):
        launch(KERNELS, template, storage_dtype, n_items, args)
