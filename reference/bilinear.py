"""Vectorised bilinear sampling, the two rules of docs/deform_conv.md (A) and
docs/roi.md (B), in float64.

Both rules describe a sample by its 4 corners: ``value = sum_k weights[k] * X[rows[k], cols[k]]``
and ``d value / dh = sum_k weights_dh[k] * X[rows[k], cols[k]]`` (same for w). Corner arrays
have shape ``[4, *S]`` where ``S`` is the shape of the position arrays; the corner order is
(h0, w0), (h0, w0+1), (h0+1, w0), (h0+1, w0+1). Indices always lie inside the image so they can
be used for gathering; a corner that must not contribute has weight 0 and ``valid``
False, so the same arrays serve the forward gather and the backward scatter.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Corners:
    """The 4 corners of each sample; every array has shape ``[4, *S]``.

    rows, cols: int64 corner indices inside ``[0, H) x [0, W)``; 0 where not valid.
    valid: bool, the corner contributes to the sample.
    weights: float64 bilinear weights, 0 where not valid.
    weights_dh, weights_dw: float64 derivatives of ``weights`` by the sample's h and w.
    """

    rows: np.ndarray
    cols: np.ndarray
    valid: np.ndarray
    weights: np.ndarray
    weights_dh: np.ndarray
    weights_dw: np.ndarray


@dataclass(frozen=True)
class Samples:
    """Sampled values of ``images[batch_index, c]``; values, d_dh, d_dw have shape ``[*S, C]``."""

    values: np.ndarray
    d_dh: np.ndarray
    d_dw: np.ndarray
    corners: Corners


def _corner_arrays(h0, w0, h1, w1, lh, lw, dlh, dlw, valid, height, width):
    """Corners of the standard bilinear stencil; every argument is an array of shape ``S``.

    h0, w0, h1, w1: integer corner coordinates (possibly outside the image).
    lh, lw: fractional positions inside the cell; dlh, dlw: their derivatives by h and w.
    valid: bool ``[4, *S]``, which corners contribute.
    """
    hh, hw = 1.0 - lh, 1.0 - lw
    rows = np.stack([h0, h0, h1, h1])
    cols = np.stack([w0, w1, w0, w1])
    weights = np.stack([hh * hw, hh * lw, lh * hw, lh * lw])
    weights_dh = np.stack([-hw, -lw, hw, lw]) * dlh
    weights_dw = np.stack([-hh, hh, -lh, lh]) * dlw
    # A valid corner is inside the image; the others (NaN positions too) point at pixel 0.
    return Corners(
        rows=np.where(valid, rows, 0).astype(np.int64),
        cols=np.where(valid, cols, 0).astype(np.int64),
        valid=valid,
        weights=np.where(valid, weights, 0.0),
        weights_dh=np.where(valid, weights_dh, 0.0),
        weights_dw=np.where(valid, weights_dw, 0.0),
    )


def zero_padded_corners(h, w, height, width):
    """Rule A corners (deformable convolution) for positions ``h, w`` of shape ``S``.

    The sample is 0 when ``h <= -1 or h >= H or w <= -1 or w >= W``; inside that open square a
    corner outside ``[0, H) x [0, W)`` contributes 0. Outside the open square the derivatives
    are 0 too (the forward is constant there: mmcv's boundary rule, docs/deform_conv.md). A NaN
    position counts as outside, as in ONNX Runtime.
    """
    h = np.asarray(h, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    inside = (h > -1) & (h < height) & (w > -1) & (w < width)
    h0, w0 = np.floor(h), np.floor(w)
    h1, w1 = h0 + 1, w0 + 1
    row_ok = np.stack([h0 >= 0, h0 >= 0, h1 < height, h1 < height])
    col_ok = np.stack([w0 >= 0, w1 < width, w0 >= 0, w1 < width])
    ones = np.ones_like(h)
    return _corner_arrays(h0, w0, h1, w1, h - h0, w - w0, ones, ones,
                          row_ok & col_ok & inside, height, width)


def _clamp_axis(y, size):
    """Rule B along one axis: y of shape ``S`` -> (y0, y1, ly, d ly / dy), each shape ``S``."""
    y = np.maximum(y, 0.0)
    y0 = np.floor(y)
    at_end = y0 >= size - 1
    y0 = np.where(at_end, size - 1, y0)
    y1 = np.where(at_end, y0, y0 + 1)
    y = np.where(at_end, y0, y)
    # ly moves with the position only where neither clamp is active (0 <= y < size - 1).
    slope = np.where(at_end | (y <= 0), 0.0, 1.0)
    return y0, y1, y - y0, slope


def border_clamped_corners(y, x, height, width):
    """Rule B corners (roi_align, ps_roi_align, deform_roi_pool) for positions of shape ``S``.

    The sample is 0 when ``y < -1 or y > H or x < -1 or x > W`` (inclusive at -1 and H); else
    the position is clamped to ``[0, H-1] x [0, W-1]`` and the clamped corners are interpolated,
    so ``y = -0.5`` reads row 0 in full (rule A would give half of it) and ``y = H`` reads row
    H-1. The derivatives are those of this piecewise function: 0 along an axis where a clamp
    is active.
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y0, y1, ly, dly = _clamp_axis(y, height)
    x0, x1, lx, dlx = _clamp_axis(x, width)
    valid = np.broadcast_to(inside, (4,) + inside.shape)
    return _corner_arrays(y0, x0, y1, x1, ly, lx, dly, dlx, valid, height, width)


def gather(images, batch_index, corners):
    """Sample every channel of ``images[batch_index]`` at the corners' positions.

    images: [B, C, H, W]; batch_index: int array broadcastable to ``S``; corners: shape ``[4, *S]``.
    Returns Samples with values, d_dh, d_dw of shape ``[*S, C]``.
    """
    images = np.asarray(images, dtype=np.float64)
    # Advanced indices around a slice: the result is [*S, C] for each corner.
    pixels = [images[batch_index, :, corners.rows[k], corners.cols[k]] for k in range(4)]

    def combine(weights):
        return sum(weights[k][..., None] * pixels[k] for k in range(4))

    return Samples(values=combine(corners.weights), d_dh=combine(corners.weights_dh),
                   d_dw=combine(corners.weights_dw), corners=corners)


def sample_zero_padded(images, batch_index, h, w):
    """Rule A sampling of ``images[batch_index, c]`` at ``(h, w)``.

    images: [B, C, H, W]; batch_index: int, broadcastable to ``S``; h, w: float arrays of shape ``S``.
    Returns Samples (values, d_dh, d_dw of shape ``[*S, C]``; corners of shape ``[4, *S]``).
    """
    height, width = np.shape(images)[-2:]
    return gather(images, batch_index, zero_padded_corners(h, w, height, width))


def sample_border_clamped(images, batch_index, y, x):
    """Rule B sampling of ``images[batch_index, c]`` at ``(y, x)``; shapes as sample_zero_padded."""
    height, width = np.shape(images)[-2:]
    return gather(images, batch_index, border_clamped_corners(y, x, height, width))


def scatter_to_corners(grad_images, batch_index, corners, grad_values):
    """Adjoint of the gather: add ``weight * grad_values`` to each corner, in place.

    grad_images: float64 [B, C, H, W] (accumulated into); batch_index: int, broadcastable to ``S``;
    corners: shape ``[4, *S]``; grad_values: [*S, C], the gradient of the sampled values.
    A corner that is not valid adds exactly nothing (not 0 * grad, NaN for a NaN grad, to the
    pixel it points at).
    """
    for k in range(4):
        added = np.where(corners.valid[k][..., None], corners.weights[k][..., None] * grad_values, 0.0)
        np.add.at(grad_images, (batch_index, slice(None), corners.rows[k], corners.cols[k]), added)
