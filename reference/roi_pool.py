"""roi_pool (Fast R-CNN max pooling) and ps_roi_pool (R-FCN position-sensitive average pooling),
docs/roi.md, forward and analytic backward, in float64.

Shapes: input [N, C, H, W]; rois [K, 5] or a list of per-image [L, 4] boxes; output
[K, C, PH, PW] (roi_pool) or [K, C / (PH*PW), PH, PW] (ps_roi_pool). A bin is the rectangle of
whole pixels rows [hstart, hend) x columns [wstart, wend); each roi's bins are handled at once
through boolean membership masks.

Choices the definition leaves open:
- Bin edges are exact: ``floor(ph * rh / PH)`` and ``ceil((ph+1) * rh / PH)`` in integer
  arithmetic (an implementation that computes ``ph * (rh / PH)`` in floating point agrees
  unless rounding crosses an integer).
- ps_roi_pool's roi size is ``max(xe - xs, 1)``, without roi_pool's ``+ 1``: the RoI ops follow
  torchvision, and torchvision's ps_roi_pool has no ``+ 1`` ("an average over the roi_pool bin"
  names the bin rule, hstart / hend, not the size).
- roi_pool: ties go to the first maximal pixel in row-major order, a NaN pixel is the maximum
  and the first NaN the arg-max (NumPy's max and argmax); an empty bin gives 0, arg-max -1 and
  no gradient. ps_roi_pool: an empty bin gives 0 and no gradient.
- A roi whose scaled corners are not within COORDINATE_LIMIT (docs/roi.md, "Bounded work") has
  only empty bins.
"""

import numpy as np

from .rois import cell_major, channel_major, output_pair, roi_boxes, round_half_away, scaled_box_valid


def _axis_bins(start, size, pooled, length):
    """Membership bool [pooled, length] of pixels 0..length-1 in the bins of one axis."""
    bins = np.arange(pooled)
    low = np.clip(bins * size // pooled + start, 0, length)
    high = np.clip(-(-(bins + 1) * size // pooled) + start, 0, length)
    pixels = np.arange(length)
    return (pixels >= low[:, None]) & (pixels < high[:, None])


def _bin_pixels(box, spatial_scale, output_size, height, width, end_inclusive):
    """Which pixels each bin of a roi holds: bool [PH, PW, H, W].

    box: float64 [4] (x1, y1, x2, y2), rounded half away from zero after scaling;
    end_inclusive: the roi spans xe - xs + 1 pixels (roi_pool) rather than xe - xs.
    """
    if not scaled_box_valid(box, spatial_scale):
        return np.zeros(output_size + (height, width), dtype=bool)
    start_x, start_y, end_x, end_y = round_half_away(box * spatial_scale).astype(np.int64)
    extra = 1 if end_inclusive else 0
    roi_w, roi_h = max(end_x - start_x + extra, 1), max(end_y - start_y + extra, 1)
    rows = _axis_bins(start_y, roi_h, output_size[0], height)
    cols = _axis_bins(start_x, roi_w, output_size[1], width)
    return rows[:, None, :, None] & cols[None, :, None, :]


def _roi_pool_argmax(input, rois, output_size, spatial_scale):
    """Returns (batch_index int64 [K], output [K, C, PH, PW], arg-max [K, C, PH, PW]); the
    arg-max is the flat pixel index h*W + w in the roi's image, -1 for an empty bin."""
    output_size = output_pair(output_size)
    n, channels, height, width = input.shape
    batch_index, boxes = roi_boxes(rois, n)
    output = np.zeros((len(boxes), channels) + output_size)
    argmax = np.full(output.shape, -1, dtype=np.int64)
    for k, (image, box) in enumerate(zip(batch_index, boxes)):
        inside = _bin_pixels(box, spatial_scale, output_size, height, width, True)
        masked = np.where(inside, input[image][:, None, None], -np.inf)
        flat = masked.reshape(channels, *output_size, height * width)
        nonempty = inside.any(axis=(2, 3))
        argmax[k] = np.where(nonempty, flat.argmax(axis=-1), -1)
        output[k] = np.where(nonempty, flat.max(axis=-1), 0.0)
    return batch_index, output, argmax


def roi_pool(input, rois, output_size, spatial_scale=1.0):
    """Fast R-CNN RoI max pooling; returns float64 [K, C, PH, PW]. output_size: int or (PH, PW)."""
    return _roi_pool_argmax(np.asarray(input, dtype=np.float64), rois, output_size,
                            spatial_scale)[1]


def roi_pool_backward(grad_output, input, rois, output_size, spatial_scale=1.0):
    """Gradient of roi_pool given grad_output [K, C, PH, PW]: {"input": float64 [N, C, H, W]},
    each output's gradient added to its arg-max pixel."""
    input = np.asarray(input, dtype=np.float64)
    batch_index, _, argmax = _roi_pool_argmax(input, rois, output_size, spatial_scale)
    n, channels, height, width = input.shape
    grad_input = np.zeros((n, channels, height * width))
    routed = argmax >= 0
    k, c, _, _ = np.nonzero(routed)
    np.add.at(grad_input, (batch_index[k], c, argmax[routed]),
              np.asarray(grad_output, dtype=np.float64)[routed])
    return {"input": grad_input.reshape(input.shape)}


def _ps_bin_weights(input, rois, output_size, spatial_scale):
    """Yields, per roi, (the slice of cell_major(input) it reads, averaging weights
    [PH, PW, H, W]: 1 / bin area on the bin's pixels, 0 elsewhere and in an empty bin)."""
    n, _, height, width = input.shape
    cells = output_size[0] * output_size[1]
    batch_index, boxes = roi_boxes(rois, n)
    for image, box in zip(batch_index, boxes):
        inside = _bin_pixels(box, spatial_scale, output_size, height, width, False)
        area = inside.sum(axis=(2, 3), keepdims=True)
        yield slice(image * cells, (image + 1) * cells), inside / np.maximum(area, 1)


def ps_roi_pool(input, rois, output_size, spatial_scale=1.0):
    """Position-sensitive RoI average pooling; returns float64 [K, C / (PH*PW), PH, PW]. Output
    channel c of bin (ph, pw) averages input channel (c*PH + ph)*PW + pw over the bin."""
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    images = cell_major(input, output_size[0] * output_size[1])
    return np.array([
        np.einsum("pqhw,pqchw->cpq", weights, images[cells].reshape(*output_size, *images.shape[1:]))
        for cells, weights in _ps_bin_weights(input, rois, output_size, spatial_scale)
    ]).reshape((-1, images.shape[1]) + output_size)


def ps_roi_pool_backward(grad_output, input, rois, output_size, spatial_scale=1.0):
    """Gradient of ps_roi_pool given grad_output [K, C / (PH*PW), PH, PW]:
    {"input": float64 [N, C, H, W]}."""
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    cells = output_size[0] * output_size[1]
    grad_images = np.zeros(cell_major(input, cells).shape)
    grad_output = np.asarray(grad_output, dtype=np.float64)
    for k, (roi_cells, weights) in enumerate(_ps_bin_weights(input, rois, output_size,
                                                            spatial_scale)):
        grad_images[roi_cells] += np.einsum("pqhw,cpq->pqchw", weights, grad_output[k]).reshape(
            grad_images[roi_cells].shape)
    return {"input": channel_major(grad_images, input.shape[0], cells)}
