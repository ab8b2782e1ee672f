"""CuPy RawKernel kernel set of the semi-convolutional ops (kernels in ``semiconv.cu``); the
interface is the one :mod:`pydeform.semiconv` documents (see
:class:`pydeform.backends.numba_kernels.semiconv.NumbaCpuSemiConvKernels`).

The ``*_launch`` functions marshal one kernel's arguments in the order and widths of its CUDA
signature (sizes ``long long``, flags ``int``, the coordinate factors sy, sx and max_distance in
the accumulation type) and return ``(template, n_blocks, args)``: one thread per work item for
the element-wise kernels, one block per (image, instance) or per region for the block
reductions. The kernel set and the tests' CPU host shim both launch through them. Labels are
read as int64 (converted when they are of another integer dtype); the per-instance statistics,
sigma and seeds are in the accumulation type (float32 for float16 / bfloat16 / float32).
"""

import numpy as np

from ..._arrays import accumulation_dtype
from ._compile import KernelManifest, grid_blocks, launch_blocks

KERNELS = KernelManifest(
    source="semiconv.cu",
    templates=(
        "semiconv_statistics",
        "semiconv_loss_grad",
        "semiconv_affinity",
        "semiconv_affinity_grad_psi",
        "semiconv_affinity_grad_centers",
        "semiconv_seeded",
        "semiconv_seeded_grad",
        "semiconv_votes",
        "semiconv_assign",
    ),
)


def _geometry(psi, offsets):
    """PYDEFORM_SEMICONV_GEOMETRY_PARAMS of semiconv.cu: N, D, H, W and the coordinate factors of
    channels 0 and 1 (``offsets`` = (cy, cx), the float64 [D] factors of the driver)."""
    acc = accumulation_dtype(psi.dtype).type
    cy, cx = offsets
    sx = cx[1] if len(cx) > 1 else 0.0
    return (*(np.int64(v) for v in psi.shape), acc(cy[0]), acc(sx))


def statistics_launch(psi, labels, offsets, sums, counts, norm_sums, unit_sums, with_norms):
    args = (psi, labels, sums, counts, norm_sums, unit_sums, *_geometry(psi, offsets), np.int64(counts.shape[1]),
            np.int32(bool(with_norms)))
    return "semiconv_statistics", counts.size, args


def loss_grad_launch(psi, labels, offsets, means, scales, mean_units, grad):
    args = (psi, labels, means, scales, mean_units, grad, *_geometry(psi, offsets), np.int64(scales.shape[1]))
    return "semiconv_loss_grad", grid_blocks(labels.size), args


def affinity_launch(psi, centers, sigma, offsets, out, kernel):
    args = (psi, centers, sigma, out, *_geometry(psi, offsets), np.int64(centers.shape[1]), np.int32(kernel))
    return "semiconv_affinity", grid_blocks(out.size), args


def affinity_grad_psi_launch(grad_output, psi, centers, sigma, offsets, grad_psi, kernel):
    args = (grad_output, psi, centers, sigma, grad_psi, *_geometry(psi, offsets), np.int64(centers.shape[1]),
            np.int32(kernel))
    return "semiconv_affinity_grad_psi", grid_blocks(psi.size // psi.shape[1]), args


def affinity_grad_centers_launch(grad_output, psi, centers, sigma, offsets, grad_centers, grad_sigma, kernel):
    args = (grad_output, psi, centers, sigma, grad_centers, grad_sigma, *_geometry(psi, offsets),
            np.int64(centers.shape[1]), np.int32(kernel))
    return "semiconv_affinity_grad_centers", sigma.size, args


def seeded_launch(scores, psi, sigma, offsets, seeds, weights, out, mode):
    args = (scores, psi, sigma, seeds, weights, out, *_geometry(psi, offsets), np.int32(mode))
    return "semiconv_seeded", psi.shape[0], args


def seeded_grad_launch(grad_output, scores, psi, sigma, offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                       grad_sigma, mode):
    args = (grad_output, scores, psi, sigma, seeds, weights, grad_seeds, grad_scores, grad_psi, grad_sigma,
            *_geometry(psi, offsets), np.int32(mode))
    return "semiconv_seeded_grad", psi.shape[0], args


def votes_launch(psi, foreground, offsets, counts):
    args = (psi, foreground, counts, *_geometry(psi, offsets), np.int64(counts.shape[1]), np.int64(counts.shape[2]))
    return "semiconv_votes", grid_blocks(foreground.size), args


def assign_launch(psi, foreground, centers, offsets, labels, max_distance):
    args = (psi, foreground, centers, labels, *_geometry(psi, offsets), np.int64(centers.shape[1]),
            accumulation_dtype(psi.dtype).type(max_distance))
    return "semiconv_assign", grid_blocks(labels.size), args


class CupySemiConvKernels:
    """The semi-convolutional kernel set on CuPy arrays (C-contiguous, on the current device)."""

    @property
    def xp(self):
        import cupy

        return cupy

    @staticmethod
    def statistics_dtype(dtype):
        """The accumulation dtype of ``dtype``: the per-instance statistics, sigma and seeds."""
        return accumulation_dtype(dtype)

    @staticmethod
    def workspace(op, shapes, dtype, *, backward):
        """The kernels read and write every storage type: no scratch of their own."""
        return {}

    def _labels(self, labels):
        return self.xp.ascontiguousarray(labels, dtype=np.int64)

    def statistics(self, psi, labels, offsets, sums, counts, norm_sums, unit_sums, *, with_norms):
        self._launch(psi.dtype, *statistics_launch(psi, self._labels(labels), offsets, sums, counts, norm_sums,
                                                   unit_sums, with_norms))

    def loss_grad(self, psi, labels, offsets, means, scales, mean_units, grad):
        self._launch(psi.dtype, *loss_grad_launch(psi, self._labels(labels), offsets, means, scales, mean_units, grad))

    def affinity(self, psi, centers, sigma, offsets, out, kernel):
        self._launch(psi.dtype, *affinity_launch(psi, centers, sigma, offsets, out, kernel))

    def affinity_grad(self, grad_output, psi, centers, sigma, offsets, grad_psi, grad_centers, grad_sigma, kernel):
        self._launch(psi.dtype, *affinity_grad_psi_launch(grad_output, psi, centers, sigma, offsets, grad_psi, kernel))
        self._launch(psi.dtype, *affinity_grad_centers_launch(grad_output, psi, centers, sigma, offsets, grad_centers,
                                                              grad_sigma, kernel))

    def seeded(self, scores, psi, sigma, offsets, seeds, weights, out, mode):
        self._launch(psi.dtype, *seeded_launch(scores, psi, sigma, offsets, seeds, weights, out, mode))

    def seeded_grad(self, grad_output, scores, psi, sigma, offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                    grad_sigma, mode):
        self._launch(psi.dtype, *seeded_grad_launch(grad_output, scores, psi, sigma, offsets, seeds, weights,
                                                    grad_seeds, grad_scores, grad_psi, grad_sigma, mode))

    def votes(self, psi, foreground, offsets, counts):
        counts.fill(0)
        self._launch(psi.dtype, *votes_launch(psi, foreground, offsets, counts))

    def assign(self, psi, foreground, centers, offsets, labels, max_distance):
        self._launch(psi.dtype, *assign_launch(psi, foreground, centers, offsets, labels, max_distance))

    def _launch(self, storage_dtype, template, n_blocks, args):
        launch_blocks(KERNELS, template, storage_dtype, n_blocks, args)
