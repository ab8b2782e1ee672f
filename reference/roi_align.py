"""roi_align, ps_roi_align and deform_roi_pool (docs/roi.md), forward and analytic backward,
in float64. All three average (or, roi_align only, take the max of) rule-B bilinear samples on a
regular grid in each bin of a roi; they differ in where the grid lies and which channels a bin
reads.

Shapes: input [N, C, H, W]; rois [K, 5] or a list of per-image [L, 4] boxes; output
[K, C_out, PH, PW] with C_out = C (roi_align, deform_roi_pool) or C / (PH*PW) (ps_roi_align);
offset [K, 2, PH, PW] (x first) and mask [K, 1, PH, PW] for deform_roi_pool. Loops run over rois;
each roi's samples, [PH, PW, gh, gw] of them, are handled at once.

Choices the definition leaves open:
- Derivatives are those of the forward as implemented: rule B is constant along an axis where
  its clamp is active (position <= 0 or >= size - 1), so the position derivative is 0 there,
  at the kink itself too; outside [-1, H] x [-1, W] everything is 0.
- Adaptive sampling (``sampling_ratio <= 0``) of a roi whose size is 0 or negative (possible
  when aligned, in ps_roi_align and deform_roi_pool) draws no samples: the output is 0, never
  NaN (the divisor is max(gh*gw, 1)). A positive ``sampling_ratio`` samples such a roi at the
  positions the formula gives (all on one point for size 0), as torchvision does.
- Max mode: a sample outside the image takes part with value 0 (rule B's value there); ties go
  to the first sample in (iy, ix) row-major order; a NaN sample is the maximum, the first NaN
  the arg-max (NumPy's max and argmax); a bin with no samples gives 0 and passes no
  gradient. The gradient reaches the arg-max sample's 4 corners only.
- deform_roi_pool: the offset gradient includes the mask factor (the exact derivative of
  ``mask * average``); rw and rh do not depend on the offset. rois get no gradient.
- ps_roi_align divides by max(gh*gw, 1) like roi_align (torchvision divides by gh*gw and gives
  NaN for an adaptive roi of size 0).
- Bounded work (docs/roi.md): adaptive gh is min(ceil(bin_h), MAX_ADAPTIVE_SAMPLES); a roi whose
  scaled corners are not within COORDINATE_LIMIT has no samples and a size of 0, so it gives 0
  and passes no gradient (to the input or the offsets).
"""

import math
from dataclasses import dataclass

import numpy as np

from .bilinear import sample_border_clamped, scatter_to_corners
from .rois import MAX_ADAPTIVE_SAMPLES, cell_major, channel_major, output_pair, roi_boxes, scaled_box_valid

MODES = ("avg", "max")


@dataclass(frozen=True)
class _Grid:
    """The samples of one roi: positions y, x of shape [PH, PW, gh, gw]; count = max(gh*gw, 1)
    divides the sum; roi_h, roi_w: the roi's size in pixels (after the 1x1 floor if any)."""

    y: np.ndarray
    x: np.ndarray
    count: int
    roi_h: float
    roi_w: float


def _grid(box, spatial_scale, output_size, sampling_ratio, aligned, shift_y=0.0, shift_x=0.0):
    """The sample grid of a roi.

    box: float64 [4] (x1, y1, x2, y2); aligned: shift by half a pixel and do not force the roi
    to at least 1x1; shift_y, shift_x: scalar or [PH, PW], each bin's start moves by
    ``shift * roi size`` (deform_roi_pool's ``gamma * offset``).
    """
    pooled_h, pooled_w = output_size
    if not scaled_box_valid(box, spatial_scale):
        empty = np.zeros((pooled_h, pooled_w, 0, 0))
        return _Grid(empty, empty, 1, 0.0, 0.0)
    half = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = box * spatial_scale - half
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = int(sampling_ratio)
    else:
        grid_h = min(max(math.ceil(bin_h), 0), MAX_ADAPTIVE_SAMPLES)
        grid_w = min(max(math.ceil(bin_w), 0), MAX_ADAPTIVE_SAMPLES)
    start_y = (y1 + roi_h * np.asarray(shift_y)) + np.arange(pooled_h)[:, None] * bin_h
    start_x = (x1 + roi_w * np.asarray(shift_x)) + np.arange(pooled_w)[None, :] * bin_w
    shape = (pooled_h, pooled_w, grid_h, grid_w)
    # With grid_h or grid_w 0 the positions are empty; max(., 1) only avoids dividing by 0.
    y = start_y[:, :, None, None] + ((np.arange(grid_h) + 0.5) * bin_h / max(grid_h, 1))[:, None]
    x = start_x[:, :, None, None] + (np.arange(grid_w) + 0.5) * bin_w / max(grid_w, 1)
    return _Grid(np.broadcast_to(y, shape), np.broadcast_to(x, shape),
                 max(grid_h * grid_w, 1), roi_h, roi_w)


@dataclass(frozen=True)
class _Problem:
    """One call, ready to sample.

    images: float64 [B, C_out, H, W], the input or its position-sensitive view.
    batch_index: per roi, an int or an int array [PH, PW, 1, 1] indexing images.
    grids: per roi, its _Grid.
    """

    images: np.ndarray
    batch_index: list
    grids: list


def _reduce(values, count, mode):
    """values [PH, PW, gh, gw, C] -> (output [C, PH, PW], arg-max sample [C, PH, PW] or None).

    The arg-max is the flat index iy * gw + ix of the first maximal sample, -1 without samples.
    """
    if mode == "avg":
        return values.sum(axis=(2, 3)).transpose(2, 0, 1) / count, None
    pooled_h, pooled_w, grid_h, grid_w, channels = values.shape
    flat = values.reshape(pooled_h, pooled_w, grid_h * grid_w, channels)
    if flat.shape[2] == 0:
        return np.zeros((channels, pooled_h, pooled_w)), np.full((channels, pooled_h, pooled_w), -1)
    return flat.max(axis=2).transpose(2, 0, 1), flat.argmax(axis=2).transpose(2, 0, 1)


def _forward(problem, output_size, mode):
    """Returns the output [K, C_out, PH, PW] and the per-roi samples and arg-max lists."""
    assert mode in MODES, mode
    output = np.zeros((len(problem.grids), problem.images.shape[1]) + output_size)
    samples, argmax = [], []
    for k, (index, grid) in enumerate(zip(problem.batch_index, problem.grids)):
        samples.append(sample_border_clamped(problem.images, index, grid.y, grid.x))
        output[k], roi_argmax = _reduce(samples[k].values, grid.count, mode)
        argmax.append(roi_argmax)
    return output, samples, argmax


def _backward(problem, forward, grad_output, mode):
    """Gradients given what _forward returned and grad_output [K, C_out, PH, PW]: of the images
    [B, C_out, H, W], and of each bin's start y and x (in pixels), both [K, PH, PW]."""
    output, samples, argmax = forward
    grad_images = np.zeros(problem.images.shape)
    grad_start_y = np.zeros(output.shape[:1] + output.shape[2:])
    grad_start_x = np.zeros_like(grad_start_y)
    for k, (index, grid) in enumerate(zip(problem.batch_index, problem.grids)):
        grad_bins = grad_output[k].transpose(1, 2, 0)[:, :, None, None, :]
        shape = samples[k].values.shape
        if mode == "avg":
            grad_values = np.broadcast_to(grad_bins / grid.count, shape)
        else:
            pooled_h, pooled_w, grid_h, grid_w, channels = shape
            routed = np.zeros((pooled_h, pooled_w, grid_h * grid_w, channels))
            if grid_h * grid_w:
                np.put_along_axis(routed, argmax[k].transpose(1, 2, 0)[:, :, None, :],
                                  grad_bins[:, :, 0], axis=2)
            grad_values = routed.reshape(shape)
        scatter_to_corners(grad_images, index, samples[k].corners, grad_values)
        grad_start_y[k] = np.sum(grad_values * samples[k].d_dh, axis=(2, 3, 4))
        grad_start_x[k] = np.sum(grad_values * samples[k].d_dw, axis=(2, 3, 4))
    return grad_images, grad_start_y, grad_start_x


def _roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    batch_index, boxes = roi_boxes(rois, input.shape[0])
    grids = [_grid(box, spatial_scale, output_size, sampling_ratio, aligned) for box in boxes]
    return _Problem(input, list(batch_index), grids)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
              mode="avg"):
    """RoI Align; returns float64 [K, C, PH, PW].

    output_size: int or (PH, PW); sampling_ratio <= 0: ceil(roi size / bins) samples per bin
    axis, per roi; aligned: half-pixel coordinates; mode: "avg" or "max".
    """
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    problem = _roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _forward(problem, output_size, mode)[0]


def roi_align_backward(grad_output, input, rois, output_size, spatial_scale=1.0,
                       sampling_ratio=-1, aligned=False, mode="avg"):
    """Gradient of roi_align given grad_output [K, C, PH, PW]: {"input": float64 [N, C, H, W]}."""
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    problem = _roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    forward = _forward(problem, output_size, mode)
    return {"input": _backward(problem, forward, np.asarray(grad_output, np.float64), mode)[0]}


def _ps_roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio):
    pooled_h, pooled_w = output_size
    cells = pooled_h * pooled_w
    batch_index, boxes = roi_boxes(rois, input.shape[0])
    # Bin (ph, pw) reads the image of its cell ph*PW + pw in the cell-major view.
    cell = np.arange(cells).reshape(pooled_h, pooled_w, 1, 1)
    grids = [_grid(box, spatial_scale, output_size, sampling_ratio, True) for box in boxes]
    return _Problem(cell_major(input, cells), [b * cells + cell for b in batch_index], grids)


def ps_roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """Position-sensitive RoI Align (always half-pixel aligned); returns float64
    [K, C / (PH*PW), PH, PW]. Output channel c of bin (ph, pw) averages input channel
    (c*PH + ph)*PW + pw."""
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    problem = _ps_roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio)
    return _forward(problem, output_size, "avg")[0]


def ps_roi_align_backward(grad_output, input, rois, output_size, spatial_scale=1.0,
                          sampling_ratio=-1):
    """Gradient of ps_roi_align given grad_output [K, C / (PH*PW), PH, PW]:
    {"input": float64 [N, C, H, W]}."""
    input = np.asarray(input, dtype=np.float64)
    output_size = output_pair(output_size)
    problem = _ps_roi_align_problem(input, rois, output_size, spatial_scale, sampling_ratio)
    forward = _forward(problem, output_size, "avg")
    grad_images = _backward(problem, forward, np.asarray(grad_output, np.float64), "avg")[0]
    return {"input": channel_major(grad_images, input.shape[0], output_size[0] * output_size[1])}


def _deform_roi_pool_problem(input, rois, offset, mask, output_size, spatial_scale,
                             sampling_ratio, gamma):
    """Returns (the arguments as float64 arrays, output_size as a pair, the _Problem)."""
    input, offset, mask = (None if array is None else np.asarray(array, dtype=np.float64)
                           for array in (input, offset, mask))
    output_size = output_pair(output_size)
    batch_index, boxes = roi_boxes(rois, input.shape[0])
    if mask is not None:
        assert mask.shape == (len(boxes), 1) + output_size, mask.shape
    if offset is None:
        shifts = [(0.0, 0.0)] * len(boxes)
    else:
        assert offset.shape == (len(boxes), 2) + output_size, offset.shape
        shifts = [(gamma * roi_offset[1], gamma * roi_offset[0]) for roi_offset in offset]
    grids = [_grid(box, spatial_scale, output_size, sampling_ratio, True, shift_y, shift_x)
             for box, (shift_y, shift_x) in zip(boxes, shifts)]
    return (input, offset, mask), output_size, _Problem(input, list(batch_index), grids)


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, mask=None):
    """Deformable RoI pooling (mmcv DeformRoIPool, modulated when mask is given); returns
    float64 [K, C, PH, PW].

    offset: [K, 2, PH, PW], (x, y) moving each bin by gamma * offset * roi size;
    mask: [K, 1, PH, PW], multiplies each bin's average.
    """
    (input, offset, mask), output_size, problem = _deform_roi_pool_problem(
        input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    output = _forward(problem, output_size, "avg")[0]
    return output if mask is None else output * mask


def deform_roi_pool_backward(grad_output, input, rois, offset=None, output_size=7,
                             spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None):
    """Gradients of deform_roi_pool given grad_output [K, C, PH, PW]: a dict of float64 arrays
    ``input`` [N, C, H, W], ``offset`` [K, 2, PH, PW] and ``mask`` [K, 1, PH, PW] (None for an
    absent offset or mask)."""
    (input, offset, mask), output_size, problem = _deform_roi_pool_problem(
        input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    grad_output = np.asarray(grad_output, dtype=np.float64)
    forward = _forward(problem, output_size, "avg")
    grad_average = grad_output if mask is None else grad_output * mask
    grad_input, grad_start_y, grad_start_x = _backward(problem, forward, grad_average, "avg")
    grad_offset = grad_mask = None
    if offset is not None:
        # A bin's start moves by gamma * roi size per unit of offset.
        roi_h = np.array([grid.roi_h for grid in problem.grids])[:, None, None]
        roi_w = np.array([grid.roi_w for grid in problem.grids])[:, None, None]
        grad_offset = gamma * np.stack([roi_w * grad_start_x, roi_h * grad_start_y], axis=1)
    if mask is not None:
        grad_mask = np.sum(grad_output * forward[0], axis=1, keepdims=True)
    return {"input": grad_input, "offset": grad_offset, "mask": grad_mask}
