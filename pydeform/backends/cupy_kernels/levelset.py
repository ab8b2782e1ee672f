"""CuPy RawKernel kernel set of the level-set ops (kernels in ``levelset.cu``); the interface and
the layouts are the ones :mod:`pydeform.levelset` documents (see
:class:`pydeform.backends.numba_kernels.levelset.NumbaCpuLevelSetKernels`).

The ``*_launch`` functions marshal one kernel's arguments in the order and widths of its CUDA
signature (sizes ``long long``, flags ``int``, float parameters float64) and return
``(template, n_blocks, args)``: one thread per pixel of the batch for the element-wise kernels,
one block per (image, chunk of rows) for the sums and one block per image for their totals. The
kernel set and the tests' CPU host shim both launch through them. Nothing here reads device
memory back: a MorphACWE iteration is three launches (partial sums, means, attachment, the last
reading the means from device memory) and two per smoothing step.
"""

import numpy as np

from ._compile import THREADS_PER_BLOCK, KernelManifest, grid_blocks, launch_blocks

KERNELS = KernelManifest(
    source="levelset.cu",
    templates=(
        "levelset_curvature",
        "levelset_acwe_partials",
        "levelset_acwe_means",
        "levelset_acwe_attach",
        "levelset_gac_balloon",
        "levelset_gac_attach",
        "levelset_chan_vese_sums",
        "levelset_chan_vese_step",
        "levelset_chan_vese_stats",
    ),
)

# The pixels one block of a sum kernel adds, at least: a chunk is this many pixels' worth of
# whole rows, so that each thread adds several pixels before the block's tree.
CHUNK_PIXELS = 8 * THREADS_PER_BLOCK


def _geometry(image_shape):
    """PYDEFORM_LEVELSET_GEOMETRY_PARAMS of levelset.cu for images [B, *S]: B, depth (1 for 2-D
    images), height, width, volume."""
    batch, *shape = image_shape
    volume = len(shape) == 3
    depth = shape[0] if volume else 1
    return (np.int64(batch), np.int64(depth), np.int64(shape[-2]), np.int64(shape[-1]), np.int32(volume))


def chunking(image_shape):
    """(rows per chunk, chunks per image) of the sum kernels for images [B, *S]; the chunks of
    all images fit a partial-sums array of B * rows entries, rows = prod(S[:-1])."""
    width = image_shape[-1]
    rows = int(np.prod(image_shape[1:-1]))
    rows_per_chunk = max(1, -(-CHUNK_PIXELS // max(width, 1)))
    return rows_per_chunk, -(-rows // rows_per_chunk)


def _pixels(image_shape):
    return int(np.prod(image_shape))


def curvature_launch(src, dst, image_shape, dilate):
    args = (src, dst, *_geometry(image_shape), np.int32(bool(dilate)))
    return "levelset_curvature", grid_blocks(_pixels(image_shape)), args


def acwe_partials_launch(u, image, partial):
    rows_per_chunk, chunks = chunking(image.shape)
    args = (u, image, partial, *_geometry(image.shape), np.int64(rows_per_chunk), np.int64(chunks))
    return "levelset_acwe_partials", image.shape[0] * chunks, args


def acwe_means_launch(partial, means, image_shape):
    args = (partial, means, np.int64(image_shape[0]), np.int64(chunking(image_shape)[1]))
    return "levelset_acwe_means", image_shape[0], args


def acwe_attach_launch(src, image, means, lambda1, lambda2, dst):
    args = (src, image, means, np.float64(lambda1), np.float64(lambda2), dst, *_geometry(image.shape))
    return "levelset_acwe_attach", grid_blocks(image.size), args


def gac_balloon_launch(src, gimage, limit, grow, dst):
    args = (src, gimage, limit, dst, *_geometry(gimage.shape), np.int32(bool(grow)))
    return "levelset_gac_balloon", grid_blocks(gimage.size), args


def gac_attach_launch(src, gradient, dst):
    image_shape = (gradient.shape[0], *gradient.shape[2:])
    args = (src, gradient, dst, *_geometry(image_shape))
    return "levelset_gac_attach", grid_blocks(_pixels(image_shape)), args


def _chan_vese_geometry(image):
    batch, height, width = image.shape
    rows_per_chunk, chunks = chunking(image.shape)
    return np.int64(batch), np.int64(height), np.int64(width), np.int64(rows_per_chunk), np.int64(chunks)


def chan_vese_sums_launch(phi, image, partial):
    geometry = _chan_vese_geometry(image)
    return "levelset_chan_vese_sums", image.shape[0] * int(geometry[-1]), (phi, image, partial, *geometry)


def chan_vese_step_launch(phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
    geometry = _chan_vese_geometry(image)
    args = (phi, image, stats, active, new_phi, partial, *geometry,
            *(np.float64(v) for v in (mu, lambda1, lambda2, dt)))
    return "levelset_chan_vese_step", image.shape[0] * int(geometry[-1]), args


def chan_vese_stats_launch(partial, active, stats, image_shape):
    """``active`` None: every image."""
    args = (partial, active, stats, np.int64(image_shape[0]), np.int64(chunking(image_shape)[1]),
            np.float64(image_shape[1] * image_shape[2]))
    return "levelset_chan_vese_stats", image_shape[0], args


class CupyLevelSetKernels:
    """The level-set kernel set on CuPy arrays (C-contiguous, on the current device): level sets
    uint8 ``[B, *(S + 2)]``, images float64 ``[B, *S]``."""

    @property
    def xp(self):
        import cupy

        return cupy

    @staticmethod
    def _image_shape(level_set):
        return (level_set.shape[0], *(n - 2 for n in level_set.shape[1:]))

    def sup_inf(self, src, dst):
        self._run(*curvature_launch(src, dst, self._image_shape(src), dilate=False))

    def inf_sup(self, src, dst):
        self._run(*curvature_launch(src, dst, self._image_shape(src), dilate=True))

    def acwe_means(self, u, image, partial, means):
        """means [B, 2] float64 = (c0, c1) of each image; partial: scratch [B * rows, 4]."""
        self._run(*acwe_partials_launch(u, image, partial))
        self._run(*acwe_means_launch(partial, means, image.shape))

    def acwe_attach(self, src, image, means, lambda1, lambda2, dst):
        self._run(*acwe_attach_launch(src, image, means, lambda1, lambda2, dst))

    def gac_balloon(self, src, gimage, limit, grow, dst):
        self._run(*gac_balloon_launch(src, gimage, limit, grow, dst))

    def gac_attach(self, src, gradient, dst):
        self._run(*gac_attach_launch(src, gradient, dst))

    def chan_vese_start(self, phi, image, partial, stats):
        """stats [B, 3] = (c1, c2, 0) of phi; partial: scratch [B * H, 5]."""
        self._run(*chan_vese_sums_launch(phi, image, partial))
        self._run(*chan_vese_stats_launch(partial, None, stats, image.shape))

    def chan_vese_step(self, phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
        """new_phi = one step for the images where active [B] uint8 is set; stats becomes
        (c1, c2, RMS change) of new_phi for them."""
        self._run(*chan_vese_step_launch(phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial))
        self._run(*chan_vese_stats_launch(partial, active, stats, image.shape))

    def _run(self, template, n_blocks, args):
        self._launch(np.float64, template, n_blocks, args)

    def _launch(self, storage_dtype, template, n_blocks, args):
        launch_blocks(KERNELS, template, storage_dtype, n_blocks, args)
