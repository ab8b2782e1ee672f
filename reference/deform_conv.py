"""Deformable convolution v1 / v2 (docs/deform_conv.md), forward and analytic backward, in float64.

Shapes: input [N, C, H, W], offset [N, 2*Goff*kh*kw, Ho, Wo], weight [Cout, C/G, kh, kw],
bias [Cout], mask [N, Goff*kh*kw, Ho, Wo], output [N, Cout, Ho, Wo]. K = kh*kw kernel points,
numbered i*kw + j. Everything is vectorised over (n, offset group, kernel point, output pixel).
"""

from dataclasses import dataclass

import numpy as np

from .bilinear import Samples, sample_zero_padded, scatter_to_corners


def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _as_float64(array):
    return None if array is None else np.asarray(array, dtype=np.float64)


@dataclass(frozen=True)
class _Sampled:
    """What forward and backward share.

    batch_index: [N, Goff, 1, 1, 1], indexes the [N*Goff, C/Goff, H, W] view of the input.
    samples: rule A samples; values, d_dh, d_dw are [N, Goff, K, Ho, Wo, C/Goff].
    modulation: [N, Goff, K, Ho, Wo], the mask (ones for v1).
    columns: [N, G, C/G, K, Ho, Wo], modulation * sampled values, per weight group.
    """

    batch_index: np.ndarray
    samples: Samples
    modulation: np.ndarray
    columns: np.ndarray


def _sample(input, offset, weight, stride, padding, dilation, mask):
    """Check the shapes (docs/deform_conv.md) and sample every channel at every kernel point."""
    n, channels, height, width = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    points = kh * kw
    groups = channels // group_channels
    offset_groups = offset.shape[1] // (2 * points)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    assert out_h > 0 and out_w > 0, "output would be empty"
    assert channels % group_channels == 0 and out_channels % groups == 0
    assert offset_groups >= 1 and channels % offset_groups == 0
    assert offset.shape == (n, 2 * offset_groups * points, out_h, out_w), offset.shape
    if mask is not None:
        assert mask.shape == (n, offset_groups * points, out_h, out_w), mask.shape

    # Offset channel g*2*K + 2*k is dy of kernel point k in offset group g, the next one dx.
    offset = offset.reshape(n, offset_groups, points, 2, out_h, out_w)
    kernel_i, kernel_j = np.divmod(np.arange(points), kw)
    grid_h = (kernel_i * dh)[:, None, None] + (np.arange(out_h) * sh - ph)[None, :, None]
    grid_w = (kernel_j * dw)[:, None, None] + (np.arange(out_w) * sw - pw)[None, None, :]
    sample_h = grid_h + offset[:, :, :, 0]
    sample_w = grid_w + offset[:, :, :, 1]

    images = input.reshape(n * offset_groups, channels // offset_groups, height, width)
    batch_index = (np.arange(n)[:, None] * offset_groups
                   + np.arange(offset_groups)[None, :])[:, :, None, None, None]
    samples = sample_zero_padded(images, batch_index, sample_h, sample_w)
    if mask is None:
        modulation = np.ones(sample_h.shape)
    else:
        modulation = mask.reshape(sample_h.shape)
    columns = modulation[..., None] * samples.values
    # [N, Goff, K, Ho, Wo, C/Goff] -> channel-major [N, G, C/G, K, Ho, Wo].
    columns = columns.transpose(0, 1, 5, 2, 3, 4).reshape(
        n, groups, group_channels, points, out_h, out_w)
    return _Sampled(batch_index, samples, modulation, columns)


def _grouped_weight(weight, groups):
    """weight [Cout, C/G, kh, kw] -> [G, Cout/G, C/G, K]."""
    out_channels, group_channels, kh, kw = weight.shape
    return weight.reshape(groups, out_channels // groups, group_channels, kh * kw)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution forward; returns float64 [N, Cout, Ho, Wo].

    stride, padding, dilation: int or (h, w) pair. G = C // weight.shape[1] weight groups and
    Goff = offset.shape[1] // (2*kh*kw) offset groups are inferred from the shapes; mask=None
    is v1 (every modulation 1).
    """
    input, offset, weight, bias, mask = map(_as_float64, (input, offset, weight, bias, mask))
    sampled = _sample(input, offset, weight, stride, padding, dilation, mask)
    n, groups, _, _, out_h, out_w = sampled.columns.shape
    output = np.einsum("gock,ngckyx->ngoyx", _grouped_weight(weight, groups), sampled.columns,
                       optimize=True).reshape(n, weight.shape[0], out_h, out_w)
    if bias is not None:
        output = output + bias[None, :, None, None]
    return output


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0,
                           dilation=1, mask=None):
    """Analytic gradients of deform_conv2d, given grad_output [N, Cout, Ho, Wo].

    Returns a dict of float64 arrays shaped like the arguments: ``input``, ``offset``,
    ``weight``, ``bias`` (None without bias), ``mask`` (None without mask). Where a sample lies
    outside (-1, H) x (-1, W) its offset and mask gradients are 0 (the forward does not depend on
    its position there), also where its mask value is NaN.
    """
    input, offset, weight, bias, mask, grad_output = map(
        _as_float64, (input, offset, weight, bias, mask, grad_output))
    sampled = _sample(input, offset, weight, stride, padding, dilation, mask)
    samples, modulation = sampled.samples, sampled.modulation
    n, groups, group_channels, points, out_h, out_w = sampled.columns.shape
    offset_groups = modulation.shape[1]
    channels = input.shape[1]
    grouped_weight = _grouped_weight(weight, groups)
    grad_grouped = grad_output.reshape(n, groups, weight.shape[0] // groups, out_h, out_w)

    grad_weight = np.einsum("ngoyx,ngckyx->gock", grad_grouped, sampled.columns, optimize=True)
    # Gradient of the columns, laid out like the samples: [N, Goff, K, Ho, Wo, C/Goff].
    grad_columns = np.einsum("gock,ngoyx->ngckyx", grouped_weight, grad_grouped, optimize=True)
    grad_columns = grad_columns.reshape(n, offset_groups, channels // offset_groups, points, out_h, out_w)
    grad_columns = grad_columns.transpose(0, 1, 3, 4, 5, 2)

    grad_modulation = np.sum(grad_columns * samples.values, axis=-1)
    # Outside (-1, H) x (-1, W) the offset gradient is 0 whatever the mask, a NaN one too.
    inside = samples.corners.valid.any(axis=0)
    grad_dy = np.where(inside, modulation * np.sum(grad_columns * samples.d_dh, axis=-1), 0.0)
    grad_dx = np.where(inside, modulation * np.sum(grad_columns * samples.d_dw, axis=-1), 0.0)
    grad_images = np.zeros((n * offset_groups, channels // offset_groups) + input.shape[2:])
    scatter_to_corners(grad_images, sampled.batch_index, samples.corners,
                       modulation[..., None] * grad_columns)

    return {
        "input": grad_images.reshape(input.shape),
        "offset": np.stack([grad_dy, grad_dx], axis=3).reshape(offset.shape),
        "weight": grad_weight.reshape(weight.shape),
        "bias": None if bias is None else grad_output.sum(axis=(0, 2, 3)),
        "mask": None if mask is None else grad_modulation.reshape(mask.shape),
    }
