"""The Deformable U-Net operators, forward and analytic backward, in float64: the transposed
deformable convolution (the adjoint of deformable convolution, plus a bias) and dense
deformable pooling (avg / max). Written directly from their definitions, independently of
``reference.deform_conv`` (the adjoint identity between the two is then a real test).

Shapes: deform_conv_transpose2d: input [N, Cin, H, W], offset [N, 2*Goff*kh*kw, H, W], weight
[Cin, Cout/G, kh, kw], bias [Cout], mask [N, Goff*kh*kw, H, W], output [N, Cout, Hout, Wout].
deform_pool2d: input [N, C, H, W], offset [N, 2*Goff*kh*kw, Ho, Wo], mask [N, Goff*kh*kw, Ho,
Wo], output and indices [N, C, Ho, Wo]. K = kh*kw kernel points, numbered i*kw + j.
"""

import numpy as np

from .bilinear import sample_zero_padded, scatter_to_corners, zero_padded_corners


def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _as_float64(array):
    return None if array is None else np.asarray(array, dtype=np.float64)


def _positions(offset, kernel, grid_size, stride, padding, dilation):
    """Sampling positions ``[N, Goff, K, Y, X]`` (h and w) of kernel point (i, j) anchored at
    grid pixel (y, x): ``(y*s - p + i*d + dy, x*s - p + j*d + dx)``, offsets in torchvision's
    layout (channel g*2*K + 2*k is dy of point k in offset group g, the next one dx)."""
    (kh, kw), (grid_h, grid_w) = kernel, grid_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, points = offset.shape[0], kh * kw
    offset_groups = offset.shape[1] // (2 * points)
    offset = offset.reshape(n, offset_groups, points, 2, grid_h, grid_w)
    kernel_i, kernel_j = np.divmod(np.arange(points), kw)
    base_h = (kernel_i * dh)[:, None, None] + (np.arange(grid_h) * sh - ph)[None, :, None]
    base_w = (kernel_j * dw)[:, None, None] + (np.arange(grid_w) * sw - pw)[None, None, :]
    return base_h + offset[:, :, :, 0], base_w + offset[:, :, :, 1]


def _modulation(mask, shape):
    return np.ones(shape) if mask is None else mask.reshape(shape)


def _batch_index(n, offset_groups):
    """[N, Goff, 1, 1, 1]: the image of the [N*Goff, C/Goff, H, W] view for (n, g)."""
    return (np.arange(n)[:, None] * offset_groups + np.arange(offset_groups)[None, :])[:, :, None, None, None]


# Transposed deformable convolution.


def _transpose_geometry(input, offset, weight, bias, stride, padding, output_padding, dilation, groups, mask):
    n, in_channels, height, width = input.shape
    weight_in, out_per_group, kh, kw = weight.shape
    points = kh * kw
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = map(_pair, (stride, padding, output_padding, dilation))
    out_channels = out_per_group * groups
    offset_groups = offset.shape[1] // (2 * points)
    out_h = (height - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    out_w = (width - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    assert weight_in == in_channels and in_channels % groups == 0
    assert 0 <= oph < sh and 0 <= opw < sw and out_h > 0 and out_w > 0
    assert offset_groups >= 1 and out_channels % offset_groups == 0
    assert offset.shape == (n, 2 * offset_groups * points, height, width), offset.shape
    if mask is not None:
        assert mask.shape == (n, offset_groups * points, height, width), mask.shape
    if bias is not None:
        assert bias.shape == (out_channels,), bias.shape
    return dict(kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                out_channels=out_channels, offset_groups=offset_groups, out_size=(out_h, out_w))


def _splat_values(input, weight, groups, offset_groups, modulation):
    """What input pixel (n, c, y, x) sends to output channel o through kernel point k, summed
    over the input channels c of o's weight group: ``m * sum_c weight[c, o', k] * input[n, c, y, x]``,
    as [N, Goff, K, H, W, Cout/Goff]."""
    n, in_channels, height, width = input.shape
    _, out_per_group, kh, kw = weight.shape
    grouped_input = input.reshape(n, groups, in_channels // groups, height, width)
    grouped_weight = weight.reshape(groups, in_channels // groups, out_per_group, kh * kw)
    per_out = np.einsum("ngcyx,gcok->ngokyx", grouped_input, grouped_weight, optimize=True)
    per_out = per_out.reshape(n, offset_groups, groups * out_per_group // offset_groups, kh * kw, height, width).transpose(0, 1, 3, 4, 5, 2)
    return modulation[..., None] * per_out


def deform_conv_transpose2d(input, offset, weight, bias=None, stride=1, padding=0, output_padding=0,
                            dilation=1, groups=1, mask=None):
    """Transposed deformable convolution; returns float64 [N, Cout, Hout, Wout].

    Every input value is splatted, times ``weight[c, o', i, j] * m``, onto the four rule-A
    corners of its sampling position ``(y*sh - ph + i*dh + dy, x*sw - pw + j*dw + dx)`` in each
    output channel o of its weight group (a corner outside the output contributes nothing);
    offset group ``o // (Cout/Goff)``. Zero offsets and no mask give conv_transpose2d.
    """
    input, offset, weight, bias, mask = map(_as_float64, (input, offset, weight, bias, mask))
    geom = _transpose_geometry(input, offset, weight, bias, stride, padding, output_padding, dilation, groups, mask)
    n = input.shape[0]
    offset_groups, (out_h, out_w) = geom["offset_groups"], geom["out_size"]
    h, w = _positions(offset, geom["kernel"], input.shape[2:], geom["stride"], geom["padding"], geom["dilation"])
    values = _splat_values(input, weight, groups, offset_groups, _modulation(mask, h.shape))
    output = np.zeros((n * offset_groups, geom["out_channels"] // offset_groups, out_h, out_w))
    scatter_to_corners(output, _batch_index(n, offset_groups), zero_padded_corners(h, w, out_h, out_w), values)
    output = output.reshape(n, geom["out_channels"], out_h, out_w)
    if bias is not None:
        output += bias[None, :, None, None]
    return output


def deform_conv_transpose2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0,
                                     output_padding=0, dilation=1, groups=1, mask=None):
    """Analytic gradients of deform_conv_transpose2d, given grad_output [N, Cout, Hout, Wout].

    Returns a dict of float64 arrays shaped like the arguments: ``input``, ``offset``,
    ``weight``, ``bias`` (None without bias), ``mask`` (None without mask). A splat reads back
    as a sample: the gradient of what reaches output channel o through point k is the rule-A
    sample of ``grad_output[n, o]`` at the splat position (0, with 0 derivatives, outside
    ``(-1, Hout) x (-1, Wout)``).
    """
    input, offset, weight, bias, mask, grad_output = map(
        _as_float64, (input, offset, weight, bias, mask, grad_output))
    geom = _transpose_geometry(input, offset, weight, bias, stride, padding, output_padding, dilation, groups, mask)
    n, in_channels, height, width = input.shape
    _, out_per_group, kh, kw = weight.shape
    offset_groups, out_channels, points = geom["offset_groups"], geom["out_channels"], kh * kw
    h, w = _positions(offset, geom["kernel"], (height, width), geom["stride"], geom["padding"], geom["dilation"])
    modulation = _modulation(mask, h.shape)
    images = grad_output.reshape(n * offset_groups, out_channels // offset_groups, *grad_output.shape[2:])
    # Each sample: [N, Goff, K, H, W, Cout/Goff] -> [N, G, Cout/G, K, H, W] by output channel.
    samples = sample_zero_padded(images, _batch_index(n, offset_groups), h, w)

    def by_output_channel(array):
        return array.transpose(0, 1, 5, 2, 3, 4).reshape(n, groups, out_per_group, points, height, width)

    sampled = by_output_channel(samples.values)
    modulation_o = by_output_channel(np.broadcast_to(modulation[..., None], samples.values.shape))
    grouped_input = input.reshape(n, groups, in_channels // groups, height, width)
    grouped_weight = weight.reshape(groups, in_channels // groups, out_per_group, points)
    grad_input = np.einsum("gcok,ngokyx->ngcyx", grouped_weight, modulation_o * sampled, optimize=True)
    grad_weight = np.einsum("ngcyx,ngokyx->gcok", grouped_input, modulation_o * sampled, optimize=True)
    # sum_c weight * input, per output channel: [N, Goff, K, H, W, Cout/Goff], unmodulated.
    received = _splat_values(input, weight, groups, offset_groups, np.ones(h.shape))
    grad_mask = np.sum(received * samples.values, axis=-1)
    grad_dy = modulation * np.sum(received * samples.d_dh, axis=-1)
    grad_dx = modulation * np.sum(received * samples.d_dw, axis=-1)
    return {
        "input": grad_input.reshape(input.shape),
        "offset": np.stack([grad_dy, grad_dx], axis=3).reshape(offset.shape),
        "weight": grad_weight.reshape(weight.shape),
        "bias": None if bias is None else grad_output.sum(axis=(0, 2, 3)),
        "mask": None if mask is None else grad_mask.reshape(mask.shape),
    }


# Deformable pooling.


def _pool_samples(input, offset, kernel_size, stride, padding, dilation, mask):
    """Check the shapes and sample every channel at every kernel point: (samples, modulation,
    values [N, Goff, K, Ho, Wo, C/Goff] = m * B_A, batch index)."""
    n, channels, height, width = input.shape
    kh, kw = _pair(kernel_size)
    stride = (kh, kw) if stride is None else _pair(stride)
    (sh, sw), (ph, pw), (dh, dw) = stride, _pair(padding), _pair(dilation)
    points = kh * kw
    out_h = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    offset_groups = offset.shape[1] // (2 * points)
    assert out_h > 0 and out_w > 0 and offset_groups >= 1 and channels % offset_groups == 0
    assert offset.shape == (n, 2 * offset_groups * points, out_h, out_w), offset.shape
    if mask is not None:
        assert mask.shape == (n, offset_groups * points, out_h, out_w), mask.shape
    h, w = _positions(offset, (kh, kw), (out_h, out_w), (sh, sw), (ph, pw), (dh, dw))
    batch_index = _batch_index(n, offset_groups)
    images = input.reshape(n * offset_groups, channels // offset_groups, height, width)
    samples = sample_zero_padded(images, batch_index, h, w)
    modulation = _modulation(mask, h.shape)
    return samples, modulation, modulation[..., None] * samples.values, batch_index


def _by_channel(values, channels):
    """[N, Goff, K, Ho, Wo, C/Goff] -> [N, C, K, Ho, Wo]."""
    n, offset_groups, points, out_h, out_w, _ = values.shape
    return values.transpose(0, 1, 5, 2, 3, 4).reshape(n, channels, points, out_h, out_w)


def deform_pool2d(input, offset, kernel_size, stride=None, padding=0, dilation=1, mode="max", mask=None,
                  return_indices=False):
    """Dense deformable pooling; returns float64 [N, C, Ho, Wo] (and int32 indices).

    ``v_k = m_k * B_A(input[n, c], y*sh - ph + i*dh + dy_k, x*sw - pw + j*dw + dx_k)``;
    avg: ``sum_k v_k / (kh*kw)``; max: ``max_k v_k``, ties to the lowest k, a NaN v_k wins (the
    first NaN). ``return_indices`` (max mode only) adds the chosen k as int32 [N, C, Ho, Wo].
    """
    assert mode in ("avg", "max") and not (return_indices and mode == "avg")
    input, offset, mask = map(_as_float64, (input, offset, mask))
    _, _, values, _ = _pool_samples(input, offset, kernel_size, stride, padding, dilation, mask)
    values = _by_channel(values, input.shape[1])
    if mode == "avg":
        return values.mean(axis=2)
    # np.argmax takes the first maximum, and the first NaN over any number.
    indices = np.argmax(values, axis=2)
    output = np.take_along_axis(values, indices[:, :, None], axis=2)[:, :, 0]
    return (output, indices.astype(np.int32)) if return_indices else output


def deform_pool2d_backward(grad_output, input, offset, kernel_size, stride=None, padding=0, dilation=1,
                           mode="max", mask=None):
    """Analytic gradients of deform_pool2d; a dict of float64 ``input``, ``offset`` and ``mask``
    (None without mask). avg spreads ``grad / (kh*kw)`` over every point, max routes it all
    through the arg-max point."""
    assert mode in ("avg", "max")
    input, offset, mask, grad_output = map(_as_float64, (input, offset, mask, grad_output))
    n, channels = input.shape[:2]
    samples, modulation, values, batch_index = _pool_samples(
        input, offset, kernel_size, stride, padding, dilation, mask)
    _, offset_groups, points, out_h, out_w, per_group = values.shape
    if mode == "avg":
        routed = np.ones((n, channels, points, out_h, out_w), bool)
        grad_points = np.broadcast_to(grad_output[:, :, None] / points, routed.shape)
    else:
        chosen = np.argmax(_by_channel(values, channels), axis=2)
        routed = np.arange(points)[None, None, :, None, None] == chosen[:, :, None]
        grad_points = np.where(routed, grad_output[:, :, None], 0.0)

    def samples_layout(array):
        """[N, C, K, Ho, Wo] -> the samples' layout [N, Goff, K, Ho, Wo, C/Goff]."""
        return array.reshape(n, offset_groups, per_group, points, out_h, out_w).transpose(0, 1, 3, 4, 5, 2)

    # Only the routed points take part (a point max mode passed over adds nothing, even where
    # its mask or sample is infinite).
    routed, grad_values = samples_layout(routed), samples_layout(grad_points)

    def routed_sum(terms):
        return np.sum(np.where(routed, grad_values * terms, 0.0), axis=-1)

    grad_images = np.zeros((n * offset_groups, per_group) + input.shape[2:])
    scatter_to_corners(grad_images, batch_index, samples.corners,
                       np.where(routed, modulation[..., None] * grad_values, 0.0))
    grad_mask = routed_sum(samples.values)
    grad_dy = np.where(routed.any(axis=-1), modulation, 0.0) * routed_sum(samples.d_dh)
    grad_dx = np.where(routed.any(axis=-1), modulation, 0.0) * routed_sum(samples.d_dw)
    return {
        "input": grad_images.reshape(input.shape),
        "offset": np.stack([grad_dy, grad_dx], axis=3).reshape(offset.shape),
        "mask": None if mask is None else grad_mask.reshape(mask.shape),
    }
