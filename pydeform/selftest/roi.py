"""The RoI family's selftest checks: RoI Align of an affine image is the affine function at the
bin centres (bilinear interpolation is exact on it); RoI Pool of a ramp is the last pixel of each
bin; position-sensitive pooling of a channel-constant input returns each bin's channel;
deformable RoI pooling with zero offsets is aligned RoI Align, and its mask multiplies the
output; the generic checks of every gradient."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import roi as roi_ops
from .common import OUTPUT_TOLERANCE, OpCalls, cases_of, check, forward_check, register_common_checks, run_forward

#
# Box corners lie on a 1/16-pixel grid of the feature map and spatial scales are powers of two, so
# boxes, roi sizes and adaptive sample counts are exact in every dtype: runs in different dtypes
# sample at the same places. Each case has INSIDE_ROIS boxes inside the map first; the roi_align /
# roi_pool families add boxes reaching past the borders and one of zero height.

INSIDE_ROIS = 4
BOX_GRID = 16


class RoICase(NamedTuple):
    """One geometry of a RoI op.

    map_shape: the input's (N, C, H, W); channels_out, pooled: the output's channels and (PH, PW);
    keywords: the op's other arguments as (name, value) pairs; arguments: (name, value) pairs
    saying which optional arrays the case passes (read by the op's argument builder).
    """

    map_shape: tuple
    channels_out: int
    pooled: tuple
    keywords: tuple
    arguments: tuple = ()

    def options(self) -> dict:
        return dict(self.keywords)

    def output_shape(self, arrays) -> tuple:
        return (len(arrays["rois"]), self.channels_out, *self.pooled)


def _roi_case(map_shape, pooled, channels_out=None, arguments=(), **keywords):
    """A case of an op whose output size is its ``output_size`` argument."""
    channels_out = map_shape[1] if channels_out is None else channels_out
    return RoICase(map_shape, channels_out, pooled, tuple(dict(output_size=pooled, **keywords).items()),
                   tuple(dict(arguments).items()))


def roi_calls(op, cases, arrays_of):
    """The OpCalls of RoI op ``op`` (``pydeform.<op>`` and ``<op>_backward``)."""
    return OpCalls(op, getattr(roi_ops, op), getattr(roi_ops, f"{op}_backward"), cases_of(cases, arrays_of))


def identity_check(calls, name, expected, prepare):
    """Register a forward check against a NumPy answer (see :func:`forward_check`)."""
    check(calls.op, name, OUTPUT_TOLERANCE)(forward_check(calls, expected, prepare))


def affine_answer(channels_of, positions_of):
    """The expected output on an affine image: its value in the input channels
    ``channels_of(case)`` read by each output element, at ``positions_of(case, arguments)``."""
    return lambda backend, dtype, case, arrays: _affine_at(case, arrays, channels_of(case),
                                                           *positions_of(case, arrays))


def _on_box_grid(rng, low, high, size):
    """Uniform draws from the multiples of 1/BOX_GRID in [low, high] (arrays broadcast)."""
    return rng.integers(np.ceil(np.multiply(low, BOX_GRID)), np.floor(np.multiply(high, BOX_GRID)) + 1,
                        size) / BOX_GRID


def inside_boxes(rng, count, height, width):
    """[count, 4] feature-map boxes (x1, y1, x2, y2), at least 1.5 pixels wide and high, within
    [0.5, size - 1.5]: roi_align samples them inside [0, size - 1] aligned or not, and roi_pool's
    rounded boxes and bins lie inside the map."""
    sizes = np.array([width, height])
    sides = _on_box_grid(rng, 1.5, 0.75 * (sizes - 2), (count, 2))
    starts = _on_box_grid(rng, 0.5, sizes - 1.5 - sides, (count, 2))
    return np.concatenate([starts, starts + sides], axis=1)


def border_boxes(height, width):
    """Feature-map boxes past the top-left and past the bottom-right border, and one of zero
    height."""
    return np.array([[-2.25, -1.75, 3.125, 4.5],
                     [width - 3.0, height - 2.5, width + 2.0, height + 1.5],
                     [4.0, 2.5, 6.5, 2.5]])


def _rois(rng, case, feature_boxes):
    """[K, 5] rois in image coordinates from feature-map boxes, with random batch indices."""
    scale = case.options()["spatial_scale"]
    return np.column_stack([rng.integers(0, case.map_shape[0], len(feature_boxes)), feature_boxes / scale])


def _ramp(case):
    """input[n, c, y, x] = W*y + x: whole numbers below 256 (maps of at most 256 pixels), exact
    in every dtype, strictly increasing in row-major order."""
    n, channels, height, width = case.map_shape
    ramp = width * np.arange(height)[:, None] + np.arange(width)
    return np.broadcast_to(ramp, case.map_shape).astype(np.float64)


def _plain_roi_arrays(case, rng):
    """input and rois of roi_align / roi_pool and their position-sensitive variants. The input's
    values are random, hence distinct: no two samples of a bin tie for the max unless they read
    the same place (then every run picks the first)."""
    n, channels, height, width = case.map_shape
    boxes = np.concatenate([inside_boxes(rng, INSIDE_ROIS, height, width), border_boxes(height, width)])
    return {"input": rng.standard_normal(case.map_shape), "rois": _rois(rng, case, boxes)}


def _batch(arrays):
    return arrays["rois"][:, 0].astype(np.int64)


def _inside(arrays, **replaced):
    """The arguments for the inside boxes alone, with some arguments replaced."""
    kept = {name: value[:INSIDE_ROIS] if name != "input" else value for name, value in arrays.items()}
    return dict(kept, **replaced)


def _affine_coefficients(case):
    """(a, b, d), each [N, C]: multiples of 1/4 whose image a*x + b*y + d is exact in every dtype."""
    n, channels = case.map_shape[:2]
    index = np.arange(n * channels).reshape(n, channels)
    return 0.25 * (1 + index % 3) * (-1.0) ** index, 0.5 - 0.25 * (index % 4), index - 2.0


def _affine_image(case):
    a, b, d = (v[:, :, None, None] for v in _affine_coefficients(case))
    height, width = case.map_shape[2:]
    return a * np.arange(width) + b * np.arange(height)[:, None] + d


def _affine_at(case, arrays, channels, y, x):
    """The affine image of each roi's image at y, x ([K, C_out or 1, PH or 1, PW or 1]), in input
    channels ``channels`` (broadcast against [C_out, PH, PW]): [K, C_out, PH, PW]."""
    a, b, d = (v[_batch(arrays)][:, channels] for v in _affine_coefficients(case))
    return a * x + b * y + d


def _own_channels(case):
    return np.arange(case.map_shape[1])[:, None, None]


def _cell_channels(case):
    """Position-sensitive RoI Align / Pool: bin (ph, pw) of output channel c reads input channel
    (c*PH + ph)*PW + pw, the C-order flattening of [C_out, PH, PW]."""
    return np.arange(case.map_shape[1]).reshape(case.channels_out, *case.pooled)


def _scaled_boxes(case, arrays, shift):
    """x1, y1 and the roi width and height on the feature map, corners moved by ``shift``: [K] each."""
    x1, y1, x2, y2 = (arrays["rois"][:, 1:] * case.options()["spatial_scale"] - shift).T
    return x1, y1, x2 - x1, y2 - y1


def _bin_centres(case, arrays, aligned):
    """roi_align's bin centres: y [K, 1, PH, 1], x [K, 1, 1, PW]."""
    pooled_h, pooled_w = case.pooled
    x1, y1, width, height = _scaled_boxes(case, arrays, 0.5 if aligned else 0.0)
    if not aligned:
        width, height = np.maximum(width, 1.0), np.maximum(height, 1.0)
    y = y1[:, None] + (np.arange(pooled_h) + 0.5) * (height / pooled_h)[:, None]
    x = x1[:, None] + (np.arange(pooled_w) + 0.5) * (width / pooled_w)[:, None]
    return y[:, None, :, None], x[:, None, None, :]


def _average_mode_affine(case, arrays):
    return None if case.options()["mode"] == "max" else _inside(arrays, input=_affine_image(case))


def _channel_constant(case, arrays):
    """Each channel of each image constant (its top-left value), inside boxes."""
    return _inside(arrays, input=np.broadcast_to(arrays["input"][:, :, :1, :1], case.map_shape).copy())


def _position_sensitive_constants(backend, dtype, case, arrays):
    return arrays["input"][_batch(arrays), :, 0, 0][:, _cell_channels(case)]


ROI_ALIGN_CASES = (
    _roi_case((2, 3, 12, 14), (3, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True, mode="avg"),
    _roi_case((2, 3, 10, 12), (2, 2), spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"),
    _roi_case((1, 2, 12, 12), (2, 3), spatial_scale=0.25, sampling_ratio=0, aligned=True, mode="max"),
    _roi_case((2, 2, 9, 11), (2, 2), spatial_scale=0.5, sampling_ratio=2, aligned=False, mode="max"),
)
ROI_ALIGN = roi_calls("roi_align", ROI_ALIGN_CASES, _plain_roi_arrays)
identity_check(ROI_ALIGN, "affine image = affine at bin centres", affine_answer(
    _own_channels, lambda case, arrays: _bin_centres(case, arrays, case.options()["aligned"])),
    _average_mode_affine)
register_common_checks(ROI_ALIGN, ("input",))

PS_ROI_ALIGN_CASES = (
    _roi_case((2, 12, 12, 14), (2, 3), channels_out=2, spatial_scale=0.5, sampling_ratio=2),
    _roi_case((1, 4, 10, 10), (2, 2), channels_out=1, spatial_scale=1.0, sampling_ratio=-1),
)
PS_ROI_ALIGN = roi_calls("ps_roi_align", PS_ROI_ALIGN_CASES, _plain_roi_arrays)
identity_check(PS_ROI_ALIGN, "channel-constant input = its channels", _position_sensitive_constants,
               _channel_constant)
identity_check(PS_ROI_ALIGN, "affine image = affine at bin centres", affine_answer(
    _cell_channels, lambda case, arrays: _bin_centres(case, arrays, aligned=True)),
    lambda case, arrays: _inside(arrays, input=_affine_image(case)))
register_common_checks(PS_ROI_ALIGN, ("input",))


def pool_bins(case, arrays, extra):
    """roi_pool's bins (``extra=1``, a rounded box of xe - xs + 1 pixels) or ps_roi_pool's
    (``extra=0``): rows [hstart, hend) [K, PH] and columns [wstart, wend) [K, PW], clipped to the map."""
    scaled = arrays["rois"][:, 1:] * case.options()["spatial_scale"]
    start_x, start_y, end_x, end_y = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64).T

    def axis(start, end, pooled, size):
        length = np.maximum(end - start + extra, 1)[:, None]
        index = np.arange(pooled)
        low = index * length // pooled + start[:, None]
        high = -(-(index + 1) * length // pooled) + start[:, None]
        return np.clip(low, 0, size), np.clip(high, 0, size)

    height, width = case.map_shape[2:]
    return axis(start_y, end_y, case.pooled[0], height), axis(start_x, end_x, case.pooled[1], width)


def _ramp_inside(case, arrays):
    return _inside(arrays, input=_ramp(case))


def _ramp_last_pixels(backend, dtype, case, arrays):
    """The max of the ramp over a bin is its last pixel, row hend - 1 and column wend - 1."""
    (_, row_end), (_, column_end) = pool_bins(case, arrays, extra=1)
    width = case.map_shape[3]
    last = width * (row_end - 1)[:, :, None] + (column_end - 1)[:, None, :]
    return np.broadcast_to(last[:, None], case.output_shape(arrays))


def _ramp_bin_centres(backend, dtype, case, arrays):
    """The average of the ramp over a bin is its value at the bin's centre."""
    (row_start, row_end), (column_start, column_end) = pool_bins(case, arrays, extra=0)
    width = case.map_shape[3]
    centre = width * ((row_start + row_end - 1) / 2)[:, :, None] + ((column_start + column_end - 1) / 2)[:, None, :]
    return np.broadcast_to(centre[:, None], case.output_shape(arrays))


ROI_POOL_CASES = (
    _roi_case((2, 3, 12, 14), (3, 2), spatial_scale=0.5),
    _roi_case((2, 2, 10, 12), (2, 2), spatial_scale=1.0),
)
ROI_POOL = roi_calls("roi_pool", ROI_POOL_CASES, _plain_roi_arrays)
identity_check(ROI_POOL, "ramp image = last pixel of each bin", _ramp_last_pixels, _ramp_inside)
register_common_checks(ROI_POOL, ("input",))

PS_ROI_POOL_CASES = (
    _roi_case((2, 12, 12, 14), (2, 3), channels_out=2, spatial_scale=0.5),
    _roi_case((1, 4, 10, 10), (2, 2), channels_out=1, spatial_scale=1.0),
)
PS_ROI_POOL = roi_calls("ps_roi_pool", PS_ROI_POOL_CASES, _plain_roi_arrays)
identity_check(PS_ROI_POOL, "channel-constant input = its channels", _position_sensitive_constants,
               _channel_constant)
identity_check(PS_ROI_POOL, "ramp image = ramp at bin centres", _ramp_bin_centres, _ramp_inside)
register_common_checks(PS_ROI_POOL, ("input",))


def _off_edge_shifts(rng, start, shape):
    """Shifts of less than 2 pixels that move positions ``start`` (broadcast to ``shape``) to a
    whole number plus a fraction in [0.05, 0.95], away from the kinks of bilinear sampling."""
    target = np.floor(start) + rng.integers(-1, 2, shape) + rng.uniform(0.05, 0.95, shape)
    return target - start


# deform_roi_pool's boxes are 2 pixels per bin, sampled 2 x 2 (sampling_ratio 2 or adaptive): one
# pixel between samples, so one shift per bin places all of its samples off the pixel edges.
DEFORM_BIN_PIXELS = 2


def _deform_roi_pool_arrays(case, rng):
    """Inside boxes whose samples, moved by the offsets, stay at least 0.05 from pixel edges and
    inside [0, size - 1]; the mask in [0.1, 1]."""
    options, wanted = case.options(), dict(case.arguments)
    n, channels, height, width = case.map_shape
    sides = DEFORM_BIN_PIXELS * np.array(case.pooled[::-1])  # (x, y)
    # Box corners after the half-pixel shift, 2.5 pixels from the borders: shifts are < 2 pixels.
    starts = _on_box_grid(rng, 2.5, np.array([width, height]) - 3.5 - sides, (INSIDE_ROIS, 2))
    arrays = {"input": rng.standard_normal(case.map_shape),
              "rois": _rois(rng, case, np.concatenate([starts, starts + sides], axis=1) + 0.5)}
    shape = (INSIDE_ROIS, *case.pooled)
    if wanted["offset"]:
        # First samples of each bin: x1' + pw * 2 + 0.5 (likewise y).
        first_x = (starts[:, 0, None] + DEFORM_BIN_PIXELS * np.arange(case.pooled[1]) + 0.5)[:, None, :]
        first_y = (starts[:, 1, None] + DEFORM_BIN_PIXELS * np.arange(case.pooled[0]) + 0.5)[:, :, None]
        gain = options["gamma"] * sides
        arrays["offset"] = np.stack([_off_edge_shifts(rng, first_x, shape) / gain[0],
                                     _off_edge_shifts(rng, first_y, shape) / gain[1]], axis=1)
    if wanted["mask"]:
        arrays["mask"] = rng.uniform(0.1, 1.0, (INSIDE_ROIS, 1, *case.pooled))
    return arrays


def _deform_bin_centres(case, arrays):
    """Bin centres moved by the offsets: y, x [K, 1, PH, PW]."""
    x1, y1, width, height = _scaled_boxes(case, arrays, 0.5)
    pooled_h, pooled_w = case.pooled
    gamma = case.options()["gamma"]
    offset = arrays.get("offset", np.zeros((len(x1), 2, pooled_h, pooled_w)))
    y = (y1[:, None] + (np.arange(pooled_h) + 0.5) * (height / pooled_h)[:, None])[:, :, None]
    x = (x1[:, None] + (np.arange(pooled_w) + 0.5) * (width / pooled_w)[:, None])[:, None, :]
    moved_y = y + gamma * height[:, None, None] * offset[:, 1]
    moved_x = x + gamma * width[:, None, None] * offset[:, 0]
    return moved_y[:, None], moved_x[:, None]


def _moved_affine(backend, dtype, case, arrays):
    expected = affine_answer(_own_channels, _deform_bin_centres)(backend, dtype, case, arrays)
    return expected * arrays["mask"] if "mask" in arrays else expected


def _affine_input(case, arrays):
    return dict(arrays, input=_affine_image(case))


def _zero_offsets_no_mask(case, arrays):
    kept = {name: value for name, value in arrays.items() if name != "mask"}
    return dict(kept, offset=np.zeros((len(arrays["rois"]), 2, *case.pooled)))


def _aligned_roi_align(backend, dtype, case, arrays):
    options = case.options()
    align_case = _roi_case(case.map_shape, case.pooled, spatial_scale=options["spatial_scale"],
                           sampling_ratio=options["sampling_ratio"], aligned=True)
    return run_forward(ROI_ALIGN, backend, dtype, align_case, {"input": arrays["input"], "rois": arrays["rois"]})


def _with_mask(case, arrays):
    count = len(arrays["rois"]) * case.pooled[0] * case.pooled[1]
    return dict(arrays, mask=arrays.get("mask", np.linspace(0.2, 1.0, count).reshape(-1, 1, *case.pooled)))


def _unmasked_times_mask(backend, dtype, case, arrays):
    unmasked = {name: value for name, value in arrays.items() if name != "mask"}
    return run_forward(DEFORM_ROI_POOL, backend, dtype, case, unmasked) * arrays["mask"]


DEFORM_ROI_POOL_CASES = (
    _roi_case((2, 3, 12, 14), (2, 3), arguments=dict(offset=True, mask=True), spatial_scale=0.5,
              sampling_ratio=2, gamma=0.1),
    _roi_case((1, 2, 10, 10), (2, 2), arguments=dict(offset=True, mask=False), spatial_scale=1.0,
              sampling_ratio=0, gamma=0.2),
    _roi_case((2, 2, 12, 12), (3, 2), arguments=dict(offset=False, mask=True), spatial_scale=0.25,
              sampling_ratio=2, gamma=0.1),
)
DEFORM_ROI_POOL = roi_calls("deform_roi_pool", DEFORM_ROI_POOL_CASES, _deform_roi_pool_arrays)
identity_check(DEFORM_ROI_POOL, "zero offsets = roi_align aligned", _aligned_roi_align, _zero_offsets_no_mask)
identity_check(DEFORM_ROI_POOL, "mask = unmasked * mask", _unmasked_times_mask, _with_mask)
identity_check(DEFORM_ROI_POOL, "affine image = affine at moved centres", _moved_affine, _affine_input)
register_common_checks(DEFORM_ROI_POOL, ("input", "offset", "mask"))


def _deform_psroi_pool_arrays(case, rng):
    """Boxes of sample_per_part pixels per bin (one pixel between samples), inside the map, and
    trans (when the case has classes) moving every sample at least 0.05 from pixel edges."""
    options, classes = case.options(), dict(case.arguments)["classes"]
    scale, pooled = options["spatial_scale"], options["pooled_size"]
    part = options["part_size"] or pooled
    side = pooled * options["sample_per_part"]  # roi size on the map: (round(x2) + 1 - round(x1)) * scale
    height, width = case.map_shape[2:]
    # round(x1) = start; the first sample x1' = start * scale - 0.5 lies >= 2.5 from the border.
    starts = np.column_stack([rng.integers(np.ceil(3 / scale), np.floor((size - 2.5 - side) / scale) + 1,
                                           INSIDE_ROIS) for size in (width, height)])
    boxes = np.concatenate([starts, starts + side / scale - 1], axis=1) + 0.25
    arrays = {"input": rng.standard_normal(case.map_shape),
              "rois": np.column_stack([rng.integers(0, case.map_shape[0], INSIDE_ROIS), boxes])}
    if classes:
        first = starts * scale - 0.5  # [K, 2] (x, y); bins and samples are whole pixels apart
        shape = (INSIDE_ROIS, classes, part, part)
        shift_x = _off_edge_shifts(rng, first[:, 0, None, None, None], shape)
        shift_y = _off_edge_shifts(rng, first[:, 1, None, None, None], shape)
        trans = np.stack([shift_x, shift_y], axis=2) / (options["trans_std"] * side)
        arrays["trans"] = trans.reshape(INSIDE_ROIS, 2 * classes, part, part)
    return arrays


def _psroi_channels(case):
    """Bin (ph, pw) of output channel c reads input channel (c*gs + gh)*gs + gw with group cell
    gh = floor(ph*gs/P): [C_out, P, P]."""
    options = case.options()
    group, pooled = options["group_size"], options["pooled_size"]
    cell = np.arange(pooled) * group // pooled
    return (np.arange(case.channels_out)[:, None, None] * group + cell[:, None]) * group + cell


def _psroi_group_constants(backend, dtype, case, arrays):
    return arrays["input"][_batch(arrays), :, 0, 0][:, _psroi_channels(case)]


def _psroi_sample_means(case, arrays):
    """The mean sample position of each bin, y and x [K, C_out, P, P]: the bin's first sample
    moved by its class's trans at its part cell, plus (sample_per_part - 1) / 2 steps."""
    options = case.options()
    scale, pooled, samples = options["spatial_scale"], options["pooled_size"], options["sample_per_part"]
    part = options["part_size"] or pooled
    corners = arrays["rois"][:, 1:]
    rounded = np.sign(corners) * np.floor(np.abs(corners) + 0.5)
    x1, y1 = (rounded[:, :2] * scale - 0.5).T
    width, height = (np.maximum((rounded[:, 2:] + 1) * scale - 0.5 - rounded[:, :2] * scale + 0.5, 0.1)).T
    bins = np.arange(pooled)
    y = y1[:, None] + bins * (height / pooled)[:, None] + (samples - 1) / 2 * (height / pooled / samples)[:, None]
    x = x1[:, None] + bins * (width / pooled)[:, None] + (samples - 1) / 2 * (width / pooled / samples)[:, None]
    y, x = y[:, None, :, None], x[:, None, None, :]
    if "trans" in arrays:
        trans = arrays["trans"]
        classes = trans.shape[1] // 2
        class_of = np.arange(case.channels_out) // (case.channels_out // classes)
        cells = bins * part // pooled
        # [K, C_out, P, P]: the (x, y) trans of each output channel's class at each bin's part cell.
        at_bins = trans.reshape(len(trans), classes, 2, part, part)[:, class_of][:, :, :, cells][:, :, :, :, cells]
        y = y + at_bins[:, :, 1] * options["trans_std"] * height[:, None, None, None]
        x = x + at_bins[:, :, 0] * options["trans_std"] * width[:, None, None, None]
    return y, x


def _psroi_case(map_shape, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                spatial_scale, classes):
    keywords = dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size, part_size=part_size,
                    sample_per_part=sample_per_part, trans_std=trans_std, spatial_scale=spatial_scale)
    return RoICase(map_shape, output_dim, (pooled_size, pooled_size), tuple(keywords.items()),
                   (("classes", classes),))


DEFORM_PSROI_POOL_CASES = (
    _psroi_case((2, 16, 14, 16), 4, 2, 3, 3, 2, trans_std=0.1, spatial_scale=1.0, classes=2),
    _psroi_case((1, 18, 16, 16), 2, 3, 3, 2, 2, trans_std=0.2, spatial_scale=0.5, classes=1),
    _psroi_case((2, 8, 14, 16), 2, 2, 2, 0, 3, trans_std=0.1, spatial_scale=1.0, classes=0),
)
DEFORM_PSROI_POOL = roi_calls("deform_psroi_pool", DEFORM_PSROI_POOL_CASES, _deform_psroi_pool_arrays)
identity_check(DEFORM_PSROI_POOL, "channel-constant input = its channels", _psroi_group_constants, _channel_constant)
identity_check(DEFORM_PSROI_POOL, "affine image = affine at moved sample means",
               affine_answer(_psroi_channels, _psroi_sample_means), _affine_input)
register_common_checks(DEFORM_PSROI_POOL, ("input", "trans"))
