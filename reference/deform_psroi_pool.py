"""Deformable position-sensitive RoI pooling (Deformable ConvNets / R-FCN, MXNet
``DeformablePSROIPooling``), docs/roi.md, forward and analytic backward, in float64.

Shapes: input [N, output_dim * group_size**2, H, W], input channel (c_out*gs + gh)*gs + gw;
rois [K, 5] or a list of per-image [L, 4] boxes; trans [K, 2 * num_classes, part_size, part_size]
(channel 2*class is x, 2*class + 1 is y) or None (no_trans); output [K, output_dim, P, P] with
P = pooled_size. Output channel c_out belongs to class c_out // (output_dim // num_classes).
Each roi's samples, [num_classes, P, P, sample_per_part, sample_per_part] of them, are handled
at once.

Choices the definition leaves open:
- ``channels_each_class = output_dim // num_classes`` and output_dim must be a multiple of
  num_classes; without trans there is one class.
- ``part_h = floor(ph * part_size / P)`` and ``gh = floor(ph * group_size / P)`` in exact integer
  arithmetic.
- A sample on the edge of [-0.5, W - 0.5] (or of [-0.5, H - 0.5]) is valid. Valid samples are
  clamped to [0, W-1] x [0, H-1] and interpolated from their 4 corners, which is rule B on
  the clamped position.
- Derivatives are those of the forward: the position derivative is 0 along an axis where the
  clamp is active (position <= 0 or >= size - 1, the kink included); the number of valid
  samples is piecewise constant and is not differentiated. The trans gradient is
  ``trans_std * roi size * sum over valid samples of dB/dx / count``, summed over the output
  channels of the class and the bins that share a part cell. rois get no gradient.
- ``output_dim=None`` means ``C // group_size**2``; ``part_size`` None or 0 means pooled_size.
- A roi whose corners times spatial_scale (before the rounding) are not within COORDINATE_LIMIT
  (docs/roi.md, "Bounded work") is invalid: 0 outputs, no gradient.
"""

from dataclasses import dataclass

import numpy as np

from .bilinear import sample_border_clamped, scatter_to_corners
from .rois import cell_major, channel_major, roi_boxes, round_half_away, scaled_box_valid


@dataclass(frozen=True)
class _Layout:
    """The parameters of one call, resolved: sizes, index maps and the input's cell-major view.

    images: [N * gs*gs * classes, per_class, H, W], image (n*gs*gs + cell)*classes + class.
    part: int [P], the part cell of each bin row / column; cell: int [P, P], the group cell
    (of cells = gs*gs) of each bin.
    """

    images: np.ndarray
    batch_index: np.ndarray
    boxes: np.ndarray
    classes: int
    per_class: int
    pooled_size: int
    part: np.ndarray
    cell: np.ndarray
    cells: int
    sample_per_part: int
    trans_std: float
    spatial_scale: float


def _layout(input, rois, trans, output_dim, group_size, pooled_size, part_size,
            sample_per_part, trans_std, spatial_scale):
    n, channels, _, _ = input.shape
    cells = group_size * group_size
    output_dim = channels // cells if output_dim is None else output_dim
    assert channels == output_dim * cells, (channels, output_dim, group_size)
    part_size = part_size or pooled_size
    batch_index, boxes = roi_boxes(rois, n)
    classes = 1
    if trans is not None:
        classes = trans.shape[1] // 2
        assert trans.shape == (len(boxes), 2 * classes, part_size, part_size), trans.shape
        assert classes >= 1 and output_dim % classes == 0, (output_dim, classes)
    bins = np.arange(pooled_size)
    group = np.clip(bins * group_size // pooled_size, 0, group_size - 1)
    return _Layout(images=cell_major(input, cells, classes), batch_index=batch_index,
                   boxes=boxes, classes=classes, per_class=output_dim // classes,
                   pooled_size=pooled_size, part=bins * part_size // pooled_size,
                   cell=group[:, None] * group_size + group[None, :], cells=cells,
                   sample_per_part=sample_per_part, trans_std=trans_std,
                   spatial_scale=spatial_scale)


@dataclass(frozen=True)
class _RoiSamples:
    """One roi's samples. samples: values [classes, P, P, S, S, per_class] read at the clamped
    positions; valid: bool [classes, P, P, S, S]; count: [classes, P, P], at least 1;
    image: int [classes, P, P, 1, 1] into the layout's images; roi_h, roi_w: the roi's size."""

    samples: object
    valid: np.ndarray
    count: np.ndarray
    image: np.ndarray
    roi_h: float
    roi_w: float


def _sample_roi(layout, k, trans):
    height, width = layout.images.shape[2:]
    x1, y1, x2, y2 = round_half_away(layout.boxes[k])
    start_x, start_y = x1 * layout.spatial_scale - 0.5, y1 * layout.spatial_scale - 0.5
    roi_w = max((x2 + 1) * layout.spatial_scale - 0.5 - start_x, 0.1)
    roi_h = max((y2 + 1) * layout.spatial_scale - 0.5 - start_y, 0.1)
    pooled = layout.pooled_size
    bin_w, bin_h = roi_w / pooled, roi_h / pooled
    if trans is None:
        shift_x = shift_y = np.zeros((layout.classes, pooled, pooled))
    else:
        # [classes, P, P]: each bin reads the (x, y) pair of its class at its part cell.
        part_trans = trans[k][:, layout.part][:, :, layout.part] * layout.trans_std
        shift_x, shift_y = part_trans[0::2] * roi_w, part_trans[1::2] * roi_h
    bins = np.arange(pooled)
    steps = np.arange(layout.sample_per_part)
    w = ((bins * bin_w + start_x)[None, None, :] + shift_x)[..., None, None] \
        + steps * (bin_w / layout.sample_per_part)
    h = ((bins * bin_h + start_y)[None, :, None] + shift_y)[..., None, None] \
        + (steps * (bin_h / layout.sample_per_part))[:, None]
    w, h = np.broadcast_arrays(w, h)
    valid = (w >= -0.5) & (w <= width - 0.5) & (h >= -0.5) & (h <= height - 0.5)
    image = ((layout.batch_index[k] * layout.cells + layout.cell) * layout.classes
             + np.arange(layout.classes)[:, None, None])[..., None, None]
    samples = sample_border_clamped(layout.images, image, np.clip(h, 0, height - 1),
                                    np.clip(w, 0, width - 1))
    count = np.maximum(valid.sum(axis=(3, 4)), 1)
    return _RoiSamples(samples, valid, count, image, roi_h, roi_w)


def _arrays(input, trans):
    return (np.asarray(input, dtype=np.float64),
            None if trans is None else np.asarray(trans, dtype=np.float64))


def deform_psroi_pool(input, rois, trans=None, output_dim=None, group_size=1, pooled_size=7,
                      part_size=None, sample_per_part=4, trans_std=0.0, spatial_scale=1.0):
    """Deformable PS RoI pooling; returns float64 [K, output_dim, P, P] (P = pooled_size).

    trans: [K, 2*num_classes, part_size, part_size] or None (no_trans); each bin of class c moves
    by trans_std * trans * roi size, read at the bin's part cell.
    """
    input, trans = _arrays(input, trans)
    layout = _layout(input, rois, trans, output_dim, group_size, pooled_size, part_size,
                     sample_per_part, trans_std, spatial_scale)
    pooled = layout.pooled_size
    output = np.zeros((len(layout.boxes), layout.classes * layout.per_class, pooled, pooled))
    for k in range(len(layout.boxes)):
        if not scaled_box_valid(layout.boxes[k], layout.spatial_scale):
            continue
        roi = _sample_roi(layout, k, trans)
        sums = np.sum(roi.samples.values * roi.valid[..., None], axis=(3, 4))
        # [classes, P, P, per_class] -> [classes * per_class, P, P]
        output[k] = (sums / roi.count[..., None]).transpose(0, 3, 1, 2).reshape(output.shape[1:])
    return output


def deform_psroi_pool_backward(grad_output, input, rois, trans=None, output_dim=None,
                               group_size=1, pooled_size=7, part_size=None, sample_per_part=4,
                               trans_std=0.0, spatial_scale=1.0):
    """Gradients of deform_psroi_pool given grad_output [K, output_dim, P, P]: a dict of float64
    arrays ``input`` [N, C, H, W] and ``trans`` (shaped like trans; None without trans)."""
    input, trans = _arrays(input, trans)
    layout = _layout(input, rois, trans, output_dim, group_size, pooled_size, part_size,
                     sample_per_part, trans_std, spatial_scale)
    pooled = layout.pooled_size
    grad_output = np.asarray(grad_output, dtype=np.float64)
    grad_images = np.zeros(layout.images.shape)
    grad_trans = None if trans is None else np.zeros(trans.shape)
    for k in range(len(layout.boxes)):
        if not scaled_box_valid(layout.boxes[k], layout.spatial_scale):
            continue
        roi = _sample_roi(layout, k, trans)
        # [classes * per_class, P, P] -> [classes, P, P, 1, 1, per_class], per valid sample.
        grad_bins = grad_output[k].reshape(layout.classes, layout.per_class, pooled, pooled)
        grad_bins = (grad_bins.transpose(0, 2, 3, 1) / roi.count[..., None])[:, :, :, None, None]
        grad_values = grad_bins * roi.valid[..., None]
        scatter_to_corners(grad_images, roi.image, roi.samples.corners, grad_values)
        if trans is not None:
            grad_x = layout.trans_std * roi.roi_w * np.sum(grad_values * roi.samples.d_dw,
                                                           axis=(3, 4, 5))
            grad_y = layout.trans_std * roi.roi_h * np.sum(grad_values * roi.samples.d_dh,
                                                           axis=(3, 4, 5))
            # Bins that share a part cell add up there.
            pairs = grad_trans[k].reshape(layout.classes, 2, *trans.shape[2:])
            classes = np.arange(layout.classes)[:, None, None]
            rows, cols = layout.part[None, :, None], layout.part[None, None, :]
            np.add.at(pairs, (classes, 0, rows, cols), grad_x)
            np.add.at(pairs, (classes, 1, rows, cols), grad_y)
    grad_input = channel_major(grad_images, input.shape[0], group_size * group_size,
                               layout.classes)
    return {"input": grad_input, "trans": grad_trans}
