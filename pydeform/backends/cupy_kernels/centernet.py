"""CuPy RawKernel kernel set of CenterNet (kernels in ``centernet.cu``); the interface is the one
:mod:`pydeform.centernet` documents.

The ``*_launch`` functions marshal one kernel's arguments in the exact order and widths of its
CUDA signature: sizes ``long long``, flags ``int``, the decode's down_ratio / threshold and the
focal loss's alpha / beta in the accumulation type, the targets' down_ratio / min_overlap in
double (their geometry is computed in double). Each returns ``(template, n_blocks, args)``:
element-wise kernels get enough blocks for one thread per work item, the block-cooperative
kernels one block per job (a decode tile, an image's selection, a focal-loss part). The kernel
set and the tests' CPU host shim both launch through them.

Scratch (from :func:`pydeform._workspace.scratch`, sized by the kernel set's plans
``decode_workspace`` / ``focal_loss_workspace``, from which the launches request it): the
decode's candidate lists of every tile, scores ``[B, tiles, capacity]`` in the accumulation
type and tile-local indices ``[B, tiles, capacity]`` int32, tiles = ceil(C*H*W / tile),
capacity = min(K, tile), where the tile is DECODE_TILE unless a test asks for a smaller one;
the focal loss's block partial sums ``[parts, 3]`` in the accumulation type.
"""

from typing import NamedTuple

import numpy as np

from ..._arrays import accumulation_dtype
from ..._workspace import scratch
from ._compile import THREADS_PER_BLOCK, KernelManifest, launch_blocks

KERNELS = KernelManifest(
    source="centernet.cu",
    templates=(
        "centernet_decode_candidates",
        "centernet_decode_detections",
        "centernet_targets",
        "centernet_focal_loss_partials",
        "centernet_focal_loss_total",
        "centernet_focal_loss_grad",
    ),
)

#: Flat indices per decode tile, also the most a tile may hold: kDecodeTile of centernet.cu.
DECODE_TILE = 2048
#: Focal-loss items per part (block partial sum) and the most parts of one call; fixed for a
#: given element count, so the summation order, and the loss, are the same on every run.
FOCAL_LOSS_PART_ITEMS = 16 * THREADS_PER_BLOCK
FOCAL_LOSS_MAX_PARTS = 1024


class DecodeTiles(NamedTuple):
    """How the decode splits each image's C*H*W flat indices."""

    size: int       # flat indices per tile
    tiles: int      # tiles per image
    capacity: int   # entries per tile's candidate list, min(K, size)


def decode_tiles(params, tile):
    tiles = -(-params.classes * params.height * params.width // tile)
    return DecodeTiles(tile, tiles, min(params.k, tile))


def _elementwise_blocks(n_items):
    return -(-n_items // THREADS_PER_BLOCK)


def _decode_geometry_args(params, tiles):
    """PYDEFORM_CENTERNET_DECODE_GEOMETRY_PARAMS of centernet.cu, all ``long long``."""
    return tuple(np.int64(v) for v in (params.classes, params.height, params.width, params.k, tiles.size))


def _acc(dtype, value):
    """A float parameter in the accumulation type of storage ``dtype``."""
    return accumulation_dtype(dtype).type(value)


def _flag(value):
    return np.int32(bool(value))


def decode_candidates_launch(heat, candidate_scores, candidate_indices, params, tiles):
    """One block per tile of each image (``tiles`` from :func:`decode_tiles`)."""
    args = (heat, candidate_scores, candidate_indices, np.int64(params.batch), *_decode_geometry_args(params, tiles),
            np.int64(params.kernel))
    return "centernet_decode_candidates", params.batch * tiles.tiles, args


def decode_detections_launch(wh, reg, candidate_scores, candidate_indices, detections, params, tiles):
    """reg may be None (a null pointer; params.has_reg says so). One block per image."""
    args = (
        wh, reg, candidate_scores, candidate_indices, detections, np.int64(params.batch),
        *_decode_geometry_args(params, tiles), _flag(params.cat_spec_wh), _flag(params.has_reg),
        _acc(wh.dtype, params.down_ratio), _flag(params.has_threshold), _acc(wh.dtype, params.threshold),
    )
    return "centernet_decode_detections", params.batch, args


def targets_launch(boxes, labels, heatmap, wh, reg, ind, reg_mask, params):
    """One work item per object slot m < min(max_boxes, max_objects) of each image and heatmap row."""
    n_items = params.batch * min(params.max_boxes, params.max_objects) * params.out_h
    args = (
        np.int64(n_items), boxes, labels, heatmap, wh, reg, ind, reg_mask,
        *(np.int64(v) for v in (params.max_boxes, params.num_classes, params.out_h, params.out_w)),
        np.float64(params.down_ratio), np.float64(params.min_overlap), np.int64(params.max_objects),
    )
    return "centernet_targets", _elementwise_blocks(n_items), args


def focal_loss_parts(n_items):
    """Partial sums of one focal-loss call over ``n_items`` elements."""
    return min(-(-n_items // FOCAL_LOSS_PART_ITEMS), FOCAL_LOSS_MAX_PARTS)


def _focal_args(dtype, params):
    return _acc(dtype, params.alpha), _acc(dtype, params.beta)


def focal_loss_partials_launch(pred, target, partials, params):
    """partials [focal_loss_parts(pred.size), 3]: one block per part."""
    n_parts = partials.shape[0]
    args = (np.int64(pred.size), np.int64(n_parts), pred, target, partials, *_focal_args(pred.dtype, params))
    return "centernet_focal_loss_partials", n_parts, args


def focal_loss_total_launch(partials, sums):
    """One block sums the parts."""
    return "centernet_focal_loss_total", 1, (np.int64(partials.shape[0]), partials, sums)


def focal_loss_grad_launch(grad_output, pred, target, sums, grad_pred, params):
    n_items = pred.size
    args = (np.int64(n_items), grad_output, pred, target, sums, grad_pred, *_focal_args(pred.dtype, params))
    return "centernet_focal_loss_grad", _elementwise_blocks(n_items), args


class CupyCenterNetKernels:
    """The CenterNet kernel set on CuPy arrays (C-contiguous, on the current device).

    ``decode_tile``: flat indices per decode tile, 1 to DECODE_TILE; tests use small tiles so
    that small heatmaps span many tiles.
    """

    def __init__(self, decode_tile=DECODE_TILE):
        if not 1 <= decode_tile <= DECODE_TILE:
            raise ValueError(f"decode_tile: expected 1 to {DECODE_TILE}, got {decode_tile}")
        self.decode_tile = decode_tile

    @property
    def xp(self):
        import cupy

        return cupy

    def decode_workspace(self, params, dtype) -> dict:
        """The scratch one :meth:`decode` call takes, ``{slot: (shape, dtype)}`` (``dtype``:
        heat's): the candidate lists of every tile, scores in the detections' dtype. The kernels
        read half types directly: no copies."""
        tiles = decode_tiles(params, self.decode_tile)
        shape = (params.batch, tiles.tiles, tiles.capacity)
        return {"centernet_candidate_scores": (shape, accumulation_dtype(dtype)),
                "centernet_candidate_indices": (shape, np.int32)}

    def decode(self, heat, wh, reg, detections, params):
        """Two launches: the tiles' candidate lists, then per image the selection, gathers and boxes."""
        tiles = decode_tiles(params, self.decode_tile)
        candidate_scores, candidate_indices = (
            scratch(self.xp, slot, shape, dtype)
            for slot, (shape, dtype) in self.decode_workspace(params, heat.dtype).items())
        self._launch(heat.dtype, *decode_candidates_launch(heat, candidate_scores, candidate_indices, params, tiles))
        self._launch(heat.dtype, *decode_detections_launch(wh, reg, candidate_scores, candidate_indices,
                                                           detections, params, tiles))

    def targets(self, boxes, labels, heatmap, wh, reg, ind, reg_mask, params):
        self._launch(boxes.dtype, *targets_launch(boxes, labels, heatmap, wh, reg, ind, reg_mask, params))

    @staticmethod
    def focal_loss_workspace(size: int, dtype, *, backward: bool = False) -> dict:
        """The scratch one :meth:`focal_loss_sums` call takes for ``size`` pixels of storage type
        ``dtype``: the partial sums of every part in the accumulation dtype, ``{slot: (shape,
        dtype)}`` (the gradient, ``backward``, needs nothing more)."""
        return {"centernet_focal_partials": ((focal_loss_parts(size), 3), accumulation_dtype(dtype))}

    def focal_loss_sums(self, pred, target, sums, params):
        ((slot, (shape, dtype)),) = self.focal_loss_workspace(pred.size, pred.dtype).items()
        partials = scratch(self.xp, slot, shape, dtype)
        self._launch(pred.dtype, *focal_loss_partials_launch(pred, target, partials, params))
        self._launch(pred.dtype, *focal_loss_total_launch(partials, sums))

    def focal_loss_grad(self, grad_output, pred, target, sums, grad_pred, params):
        self._launch(pred.dtype, *focal_loss_grad_launch(grad_output, pred, target, sums, grad_pred, params))

    def _launch(self, storage_dtype, template, n_blocks, args):
        launch_blocks(KERNELS, template, storage_dtype, n_blocks, args)
