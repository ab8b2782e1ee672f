"""What every RoI op of the reference shares (docs/roi.md): the rois argument, the output
size, Fast R-CNN rounding and the channel layout of the position-sensitive ops."""

import numpy as np

# The bounds on one output element's work (docs/roi.md, "Bounded work"): a roi with a corner
# that times spatial_scale is beyond COORDINATE_LIMIT feature-map pixels from the origin is
# invalid (0 outputs, no gradient), and adaptive sampling takes at most MAX_ADAPTIVE_SAMPLES
# samples per bin along each axis.
COORDINATE_LIMIT = 2.0**24
MAX_ADAPTIVE_SAMPLES = 1024


def scaled_box_valid(box, spatial_scale):
    """Whether every corner of box (x1, y1, x2, y2) times spatial_scale is within
    +-COORDINATE_LIMIT."""
    return bool(np.all(np.abs(np.asarray(box, dtype=np.float64) * spatial_scale) <= COORDINATE_LIMIT))


def output_pair(output_size):
    """output_size: int or (PH, PW) -> (PH, PW) as ints."""
    height, width = (output_size, output_size) if np.isscalar(output_size) else output_size
    assert height > 0 and width > 0, output_size
    return int(height), int(width)


def roi_boxes(rois, batch_size):
    """Split rois into per-roi batch indices and boxes.

    rois: float [K, 5] rows (batch_index, x1, y1, x2, y2), or a list of per-image float [L, 4]
    boxes (x1, y1, x2, y2) whose list position is their batch index.
    Returns (batch_index int64 [K], boxes float64 [K, 4]); K may be 0.
    """
    if isinstance(rois, (list, tuple)):
        rows = [np.column_stack([np.full(len(boxes), image), np.reshape(boxes, (-1, 4))])
                for image, boxes in enumerate(rois)]
        rois = np.concatenate(rows) if rows else np.zeros((0, 5))
    rois = np.asarray(rois, dtype=np.float64)
    assert rois.ndim == 2 and rois.shape[1] == 5, rois.shape
    assert np.all(np.isfinite(rois)), "rois must be finite"
    batch_index = rois[:, 0]
    assert np.all((batch_index == np.floor(batch_index)) & (batch_index >= 0)
                  & (batch_index < batch_size)), "batch index outside [0, N)"
    return batch_index.astype(np.int64), rois[:, 1:]


def round_half_away(x):
    """Round half away from zero (CUDA ``round``), not NumPy's half-to-even: 2.5 -> 3, -2.5 -> -3."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def cell_major(input, cells, classes=1):
    """The position-sensitive view: one image per (n, cell, class) holding that cell's channels.

    input: [N, classes * per_class * cells, H, W] where channel ``(class * per_class + c) * cells
    + cell`` is channel c of the class for spatial cell ``cell``. Returns
    [N * cells * classes, per_class, H, W], image ``(n * cells + cell) * classes + class``.
    """
    n, channels, height, width = input.shape
    assert channels % (cells * classes) == 0, (channels, cells, classes)
    per_class = channels // (cells * classes)
    view = input.reshape(n, classes, per_class, cells, height, width).transpose(0, 3, 1, 2, 4, 5)
    return view.reshape(n * cells * classes, per_class, height, width)


def channel_major(images, batch_size, cells, classes=1):
    """Inverse of cell_major: [N * cells * classes, per_class, H, W] -> [N, C, H, W]."""
    _, per_class, height, width = images.shape
    view = images.reshape(batch_size, cells, classes, per_class, height, width)
    return view.transpose(0, 2, 3, 1, 4, 5).reshape(
        batch_size, classes * per_class * cells, height, width)
