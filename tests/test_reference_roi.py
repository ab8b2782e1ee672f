"""The reference RoI ops (docs/roi.md): forward against hand-computed cases and against
each other where the definitions make them equal, backward against float64 central finite differences."""

import numpy as np
import pytest

from reference import (
    deform_psroi_pool,
    deform_psroi_pool_backward,
    deform_roi_pool,
    deform_roi_pool_backward,
    ps_roi_align,
    ps_roi_align_backward,
    ps_roi_pool,
    ps_roi_pool_backward,
    roi_align,
    roi_align_backward,
    roi_pool,
    roi_pool_backward,
)
from reference.bilinear import sample_border_clamped


def affine_image(n=1, channels=1, height=4, width=6):
    """X[n, c, h, w] = 1 + 1000 n + 100 c + 10 h + w: every pixel distinct, and rule-B bilinear
    sampling inside [0, H-1] x [0, W-1] is exact, so a bin's average is X at its samples' mean."""
    n, c, h, w = np.meshgrid(np.arange(n), np.arange(channels), np.arange(height),
                             np.arange(width), indexing="ij")
    return 1.0 + 1000 * n + 100 * c + 10 * h + w


def rois(*boxes):
    """[K, 5] rois from (batch_index, x1, y1, x2, y2) tuples."""
    return np.array(boxes, dtype=np.float64).reshape(-1, 5)


# --- roi_align ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_roi_align_aligned_samples_on_pixel_centres(sampling_ratio):
    # aligned: x1' = 0.5, y1' = -0.5, a 4 x 2 roi, 2 x 2 samples per bin one pixel apart (also
    # the adaptive count): bin 0 reads X[0:2, 1:3], bin 1 X[0:2, 3:5].
    out = roi_align(affine_image(), rois((0, 1, 0, 5, 2)), (1, 2), sampling_ratio=sampling_ratio,
                    aligned=True)
    np.testing.assert_allclose(out[0, 0], [[(2 + 3 + 12 + 13) / 4, (4 + 5 + 14 + 15) / 4]],
                               rtol=1e-15)
    out = roi_align(affine_image(), rois((0, 1, 0, 5, 2)), (1, 2), sampling_ratio=sampling_ratio,
                    aligned=True, mode="max")
    np.testing.assert_array_equal(out[0, 0], [[13, 15]])


def test_roi_align_unaligned_coordinates():
    # Not aligned, the same box samples half a pixel further: bin centres (1, 2) and (1, 4).
    out = roi_align(affine_image(), rois((0, 1, 0, 5, 2)), (1, 2), sampling_ratio=2)
    np.testing.assert_allclose(out[0, 0], [[13, 15]], rtol=1e-15)
    # A box on half pixels puts the unaligned samples on pixel centres again.
    out = roi_align(affine_image(), rois((0, 1.5, 0.5, 5.5, 2.5)), (1, 2), sampling_ratio=2,
                    mode="max")
    np.testing.assert_array_equal(out[0, 0], [[24, 26]])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
def test_roi_align_of_an_affine_image_is_its_value_at_the_bin_centre(aligned, sampling_ratio):
    image = affine_image(channels=2, height=9, width=11)
    box = np.array([1.3, 2.1, 8.9, 7.7])
    out = roi_align(image, rois((0, *box)), (3, 4), spatial_scale=1.0,
                    sampling_ratio=sampling_ratio, aligned=aligned)
    x1, y1, x2, y2 = box - (0.5 if aligned else 0.0)
    centre_y = y1 + (np.arange(3) + 0.5) * (y2 - y1) / 3
    centre_x = x1 + (np.arange(4) + 0.5) * (x2 - x1) / 4
    expected = 1 + 100 * np.arange(2)[:, None, None] + 10 * centre_y[:, None] + centre_x
    np.testing.assert_allclose(out[0], expected, rtol=1e-13)


def test_roi_align_adaptive_sampling_per_axis_and_per_roi():
    """sampling_ratio <= 0: gh = ceil(rh / PH), gw = ceil(rw / PW), for each roi on its own."""
    image = np.random.default_rng(0).standard_normal((1, 2, 6, 8))
    box = (0, 0.25, 0.5, 5.25, 2.7)     # rh = 2.2, rw = 5: gh = ceil(1.1) = 2, gw = 5
    out = roi_align(image, rois(box, (0, 1, 1, 2, 2)), (2, 1))
    step_y = 1.1 / 2
    for ph in range(2):
        y, x = np.meshgrid(0.5 + ph * 1.1 + (np.arange(2) + 0.5) * step_y,
                           0.25 + np.arange(5) + 0.5, indexing="ij")
        expected = sample_border_clamped(image, 0, y, x).values.mean(axis=(0, 1))
        np.testing.assert_allclose(out[0, :, ph, 0], expected, rtol=1e-14)
    # The second, 1x1 roi has one sample per bin whatever the first needs.
    np.testing.assert_allclose(out[1], roi_align(image, rois((0, 1, 1, 2, 2)), (2, 1),
                                                 sampling_ratio=1)[0], rtol=1e-15)
    assert not np.allclose(out[0], roi_align(image, rois(box), (2, 1), sampling_ratio=2)[0])


def test_roi_align_spatial_scale():
    image = np.random.default_rng(1).standard_normal((1, 2, 7, 9))
    for aligned in (False, True):
        scaled = roi_align(image, rois((0, 2.6, 1.0, 13.0, 9.8)), 3, spatial_scale=0.5,
                           aligned=aligned)
        plain = roi_align(image, rois((0, 1.3, 0.5, 6.5, 4.9)), 3, aligned=aligned)
        np.testing.assert_allclose(scaled, plain, rtol=1e-14)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, -1.0, 2, 0.0), [1.5, 2.5]),       # y = -0.5: rule B reads row 0 in full
    ((0, 0, -1.5, 2, -0.5), [1.5, 2.5]),      # y = -1 exactly is still inside
    ((0, 0, -1.6, 2, -0.6), [0.0, 0.0]),      # y = -1.1 is outside
    ((0, 0, 3.5, 2, 4.5), [31.5, 32.5]),      # y = H reads row H-1
    ((0, 5, 3.5, 7, 4.5), [36.0, 0.0]),       # x = 5.5 clamps to W-1, x = 6.5 is outside
    ((0, 10, 10, 12, 12), [0.0, 0.0]),        # wholly outside
])
def test_roi_align_border_rule(box, expected):
    # Unaligned, one sample per bin at (y1 + 0.5, x1 + 0.5) and (y1 + 0.5, x1 + 1.5).
    out = roi_align(affine_image(), rois(box), (1, 2), sampling_ratio=1)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-15)


def test_roi_align_degenerate_rois():
    image = affine_image()
    point = (0, 2, 1, 2, 1)
    # aligned, size 0, adaptive: no samples at all, so 0 (and no NaN) in both modes.
    for mode in ("avg", "max"):
        out = roi_align(image, rois(point, (0, 3, 3, 1, 1)), 2, aligned=True, mode=mode)
        np.testing.assert_array_equal(out, 0.0)
    # aligned, size 0, 2x2 samples: all on the point (1.5, 0.5).
    out = roi_align(image, rois(point), 2, sampling_ratio=2, aligned=True)
    np.testing.assert_allclose(out, 1 + 5 + 1.5, rtol=1e-15)
    # Not aligned, a roi smaller than 1x1 is grown to 1x1 from its start.
    np.testing.assert_allclose(roi_align(image, rois(point, (0, 2, 1, 1.5, 1.2)), 2),
                               roi_align(image, rois((0, 2, 1, 3, 2), (0, 2, 1, 3, 2)), 2),
                               rtol=1e-15)


def test_roi_align_max_counts_outside_samples_as_zero():
    # Half the samples of this roi are outside the image: with a negative image the max is 0.
    out = roi_align(-affine_image(), rois((0, -4, 0, 2, 2)), 1, sampling_ratio=2, mode="max")
    np.testing.assert_array_equal(out, 0.0)


def test_rois_as_a_list_of_boxes_per_image():
    image = np.random.default_rng(2).standard_normal((2, 3, 5, 6))
    boxes = [np.array([[0.5, 1, 4, 3.5], [1, 1, 2, 2]]), np.zeros((0, 4))]
    as_rows = rois((0, 0.5, 1, 4, 3.5), (0, 1, 1, 2, 2))
    np.testing.assert_array_equal(roi_align(image, boxes, 2), roi_align(image, as_rows, 2))
    as_list = [np.array([[1, 1, 2, 2]]), np.array([[0, 0, 3, 3.0]])]
    np.testing.assert_array_equal(roi_pool(image, as_list, 2),
                                  roi_pool(image, rois((0, 1, 1, 2, 2), (1, 0, 0, 3, 3)), 2))


@pytest.mark.parametrize("bad", [(2, 0, 0, 1, 1), (-1, 0, 0, 1, 1), (0.5, 0, 0, 1, 1),
                                 (0, np.nan, 0, 1, 1), (0, 0, 0, np.inf, 1)])
def test_invalid_rois_are_rejected(bad):
    with pytest.raises(AssertionError):
        roi_align(np.zeros((2, 1, 3, 3)), rois(bad), 2)


# --- roi_pool ----------------------------------------------------------------------------------

def test_roi_pool_hand_computed():
    # xs, xe = 1, 4 -> 4 columns in 2 bins [1, 3), [3, 5); rows [0, 2), [2, 4).
    out = roi_pool(affine_image(), rois((0, 1, 0, 4, 3)), 2)
    np.testing.assert_array_equal(out[0, 0], [[13, 15], [33, 35]])


def test_roi_pool_rounds_half_away_from_zero():
    image = affine_image()
    # 2.5 -> 3 and 1.5 -> 2 (np.round would give 2 and 2): the one pixel X[2, 3] = 24.
    np.testing.assert_array_equal(roi_pool(image, rois((0, 2.5, 1.5, 2.5, 1.5)), 1), 24)
    np.testing.assert_array_equal(roi_pool(image, rois((0, 5, 3, 5, 3)), 1, spatial_scale=0.5),
                                  24)
    # -2.5 -> -3: xs = -3, xe = 0, four 1-pixel bins at -3, -2, -1, 0 of which only the last
    # lies in the image (np.round's -2 would make the third bin reach pixel 0 as well).
    out = roi_pool(image, rois((0, -2.5, 0, 0.4, 0)), (1, 4))
    np.testing.assert_array_equal(out[0, 0], [[0, 0, 0, 1]])


def test_roi_pool_empty_bins_and_degenerate_rois():
    image = affine_image()
    # Wholly outside: every bin is empty.
    np.testing.assert_array_equal(roi_pool(image, rois((0, 7, 5, 9, 9)), 2), 0)
    # x2 < x1: the roi is 1 pixel wide at xs.
    np.testing.assert_array_equal(roi_pool(image, rois((0, 3, 1, 1, 1)), 1), 14)
    grads = roi_pool_backward(np.ones((1, 1, 2, 2)), image, rois((0, 7, 5, 9, 9)), 2)
    assert not grads["input"].any()


def test_roi_pool_first_maximum_wins():
    image = np.zeros((1, 1, 3, 3))
    image[0, 0, 0, 1] = image[0, 0, 1, 0] = 5.0      # a tie: (0, 1) comes first in row-major order
    grads = roi_pool_backward(np.full((1, 1, 1, 1), 2.0), image, rois((0, 0, 0, 1, 1)), 1)
    expected = np.zeros_like(image)
    expected[0, 0, 0, 1] = 2.0
    np.testing.assert_array_equal(grads["input"], expected)
    # All equal: the bin's first pixel.
    grads = roi_pool_backward(np.ones((1, 1, 1, 1)), np.ones((1, 1, 3, 3)), rois((0, 1, 1, 2, 2)), 1)
    assert grads["input"][0, 0, 1, 1] == 1.0 and grads["input"].sum() == 1.0


# --- position-sensitive ops --------------------------------------------------------------------

def channel_index_image(channels, height=5, width=6):
    """Every pixel of channel c is c."""
    return np.broadcast_to(np.arange(float(channels))[None, :, None, None],
                           (1, channels, height, width)).copy()


@pytest.mark.parametrize("op", [ps_roi_pool, ps_roi_align])
def test_position_sensitive_channel_mapping(op):
    # C_out = 2 and a 2 x 3 output: bin (ph, pw) of output channel c reads (c*2 + ph)*3 + pw.
    out = op(channel_index_image(12), rois((0, 0.5, 0.5, 4.5, 3.5)), (2, 3))
    expected = (np.arange(2)[:, None, None] * 2 + np.arange(2)[:, None]) * 3 + np.arange(3)
    np.testing.assert_allclose(out[0], expected, rtol=1e-15)


def test_ps_roi_pool_averages_bins_without_the_plus_one():
    # rw = xe - xs = 4, rh = 2 (roi_pool would use 5 and 3): columns [0, 2), [2, 4); rows 0; 1.
    image = affine_image(channels=4) - 100 * np.arange(4)[:, None, None]   # all channels alike
    out = ps_roi_pool(image, rois((0, 0, 0, 4, 2)), 2)
    np.testing.assert_allclose(out[0, 0], [[1.5, 3.5], [11.5, 13.5]], rtol=1e-15)
    # A bin outside the image is empty: 0.
    out = ps_roi_pool(image, rois((0, 4, 2, 8, 6)), 2)
    np.testing.assert_allclose(out[0, 0], [[30.5, 0], [0, 0]], rtol=1e-15)


def test_ps_roi_align_is_roi_align_aligned_on_each_bins_channel():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, 3 * 6, 7, 8))
    boxes = rois((0, 0.3, -1.2, 6.1, 5.9), (1, 2.2, 1.7, 9.5, 4.1), (1, 3, 3, 3, 3))
    for sampling_ratio in (-1, 2):
        ps = ps_roi_align(image, boxes, (2, 3), sampling_ratio=sampling_ratio)
        full = roi_align(image, boxes, (2, 3), sampling_ratio=sampling_ratio, aligned=True)
        for c, ph, pw in np.ndindex(3, 2, 3):
            np.testing.assert_allclose(ps[:, c, ph, pw], full[:, (c * 2 + ph) * 3 + pw, ph, pw],
                                       rtol=1e-14)


def test_ps_roi_align_degenerate_roi_is_zero():
    out = ps_roi_align(np.ones((1, 4, 3, 3)), rois((0, 1, 1, 1, 1)), 2)
    np.testing.assert_array_equal(out, 0.0)


# --- deform_roi_pool ---------------------------------------------------------------------------

DEFORM_BOXES = rois((0, 0.3, -1.2, 6.1, 5.9), (1, 2.2, 1.7, 9.5, 4.1), (1, -3, 4, 2, 12))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_deform_roi_pool_without_offsets_is_roi_align_aligned(sampling_ratio):
    image = np.random.default_rng(4).standard_normal((2, 3, 7, 8))
    expected = roi_align(image, DEFORM_BOXES, (2, 3), 0.5, sampling_ratio, aligned=True)
    options = {"output_size": (2, 3), "spatial_scale": 0.5, "sampling_ratio": sampling_ratio}
    np.testing.assert_array_equal(deform_roi_pool(image, DEFORM_BOXES, **options), expected)
    zeros = np.zeros((3, 2, 2, 3))
    np.testing.assert_allclose(deform_roi_pool(image, DEFORM_BOXES, zeros, **options), expected,
                               rtol=1e-15)


def test_deform_roi_pool_mask_multiplies_the_output():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((2, 3, 7, 8))
    offset = rng.uniform(-1, 1, (3, 2, 2, 3))
    mask = rng.uniform(-0.5, 1.5, (3, 1, 2, 3))
    plain = deform_roi_pool(image, DEFORM_BOXES, offset, (2, 3), sampling_ratio=2)
    masked = deform_roi_pool(image, DEFORM_BOXES, offset, (2, 3), sampling_ratio=2, mask=mask)
    np.testing.assert_allclose(masked, plain * mask, rtol=1e-15)


def test_deform_roi_pool_uniform_offset_translates_the_roi():
    """offset (dx, dy) in every bin moves the samples by gamma * (rw dx, rh dy)."""
    image = np.random.default_rng(6).standard_normal((1, 2, 9, 10))
    box = np.array([1.0, 2.0, 6.0, 4.0])          # rw = 5, rh = 2 at spatial_scale 1
    dx, dy, gamma = 0.7, -1.3, 0.2
    offset = np.broadcast_to(np.array([dx, dy])[None, :, None, None], (1, 2, 3, 2))
    moved = box + gamma * np.array([5 * dx, 2 * dy, 5 * dx, 2 * dy])
    np.testing.assert_allclose(
        deform_roi_pool(image, rois((0, *box)), offset, (3, 2), sampling_ratio=3, gamma=gamma),
        roi_align(image, rois((0, *moved)), (3, 2), sampling_ratio=3, aligned=True), rtol=1e-13)


# --- deform_psroi_pool -------------------------------------------------------------------------

@pytest.mark.parametrize("box", [(0, 1, 1, 4, 2), (0, 0.5, 0.5, 3.5, 1.5)])
def test_deform_psroi_pool_hand_computed(box):
    # round(x1) = 1 (0.5 rounds away from zero, np.round would give 0), x1' = 0.5,
    # x2' = 4.5, rw = 4, bw = 2, samples 1 apart: x = 0.5, 1.5 | 2.5, 3.5.
    # y1' = 0.5, rh = 2, bh = 1, samples 0.5 apart: y = 0.5, 1.0 | 1.5, 2.0. All inside and the
    # image is affine: each bin is X at its samples' mean, (0.75 | 1.75, 1 | 3).
    out = deform_psroi_pool(affine_image(), rois(box), output_dim=1, pooled_size=2,
                            sample_per_part=2)
    np.testing.assert_allclose(out[0, 0], [[9.5, 11.5], [19.5, 21.5]], rtol=1e-15)


def test_deform_psroi_pool_skips_samples_outside_and_counts_the_rest():
    # x1' = -1.5, rw = 4, x samples -1.5 (skipped), -0.5 (kept, clamped to 0) | 0.5, 1.5.
    # y samples 0.5, 1.0 | 1.5, 2.0 as in the hand-computed case.
    out = deform_psroi_pool(affine_image(), rois((0, -1, 1, 2, 2)), output_dim=1, pooled_size=2,
                            sample_per_part=2)
    np.testing.assert_allclose(out[0, 0], [[1 + 7.5, 2 + 7.5], [1 + 17.5, 2 + 17.5]], rtol=1e-15)
    # One bin, x1' = -1.5, y1' = 1.5, rw = rh = 2, moved by 0.1 * (4, 6) * 2 = (0.8, 1.2):
    # x samples -0.7 and 0.3, y samples 2.7 and 3.7 > H - 0.5. Only (2.7, 0.3) is valid; the
    # others are skipped, not clamped and counted.
    trans = np.array([4.0, 6.0]).reshape(1, 2, 1, 1)
    out = deform_psroi_pool(affine_image(), rois((0, -1, 2, 0, 3)), trans, output_dim=1,
                            pooled_size=1, sample_per_part=2, trans_std=0.1)
    np.testing.assert_allclose(out, 1 + 27 + 0.3, rtol=1e-14)
    # A roi outside the image has no valid sample: 0. A roi with x2 < x1 is 0.1 wide.
    out = deform_psroi_pool(affine_image(), rois((0, 9, 1, 12, 2), (0, 3, 1, 1, 2)),
                            output_dim=1, pooled_size=2, sample_per_part=2)
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.all(np.isfinite(out[1])) and np.all(out[1] != 0)


def test_deform_psroi_pool_group_cells():
    # P = 3, group_size 2: gh, gw = floor(3 bins * 2 / 3) = 0, 0, 1; input channel (c*2 + gh)*2 + gw.
    out = deform_psroi_pool(channel_index_image(8), rois((0, 0, 0, 4, 3)), output_dim=2,
                            group_size=2, pooled_size=3, sample_per_part=2)
    group = np.array([0, 0, 1])
    expected = (np.arange(2)[:, None, None] * 2 + group[:, None]) * 2 + group
    np.testing.assert_allclose(out[0], expected, rtol=1e-15)


def test_deform_psroi_pool_no_trans_equals_zero_trans():
    rng = np.random.default_rng(7)
    image = rng.standard_normal((2, 4 * 4, 6, 7))
    boxes = rois((0, 0.3, 1.2, 5.1, 4.9), (1, -2, 1, 3, 9))
    options = {"output_dim": 4, "group_size": 2, "pooled_size": 3, "sample_per_part": 3,
               "spatial_scale": 0.75}
    no_trans = deform_psroi_pool(image, boxes, None, **options)
    np.testing.assert_array_equal(
        deform_psroi_pool(image, boxes, np.zeros((2, 4, 3, 3)), trans_std=0.1, **options), no_trans)
    np.testing.assert_array_equal(
        deform_psroi_pool(image, boxes, rng.standard_normal((2, 4, 3, 3)), trans_std=0.0,
                          **options), no_trans)


def test_deform_psroi_pool_trans_of_each_class():
    """Two classes of two channels each: a trans of class 1 moves channels 2 and 3 only; 1 * 0.25 * rw
    with rw = 4 is one pixel, the same as moving the box by 1."""
    rng = np.random.default_rng(8)
    image = rng.standard_normal((1, 4, 7, 9))
    options = {"output_dim": 4, "pooled_size": 2, "sample_per_part": 2}
    trans = np.zeros((1, 4, 2, 2))
    trans[0, 2] = 1.0                                 # class 1, x
    out = deform_psroi_pool(image, rois((0, 1, 2, 4, 4)), trans, trans_std=0.25, **options)
    still = deform_psroi_pool(image, rois((0, 1, 2, 4, 4)), **options)
    moved = deform_psroi_pool(image, rois((0, 2, 2, 5, 4)), **options)
    np.testing.assert_array_equal(out[:, :2], still[:, :2])
    np.testing.assert_allclose(out[:, 2:], moved[:, 2:], rtol=1e-14)


def test_deform_psroi_pool_part_cells():
    # P = 3, part_size 2: part_h, part_w = floor(3 bins * 2 / 3) = 0, 0, 1; only trans cell
    # (1, 1) is non-zero, so only bin (2, 2) moves.
    image = np.random.default_rng(9).standard_normal((1, 1, 8, 8))
    trans = np.zeros((1, 2, 2, 2))
    trans[0, :, 1, 1] = (0.3, -0.2)
    options = {"output_dim": 1, "pooled_size": 3, "part_size": 2, "sample_per_part": 2,
               "trans_std": 0.5}
    moved = deform_psroi_pool(image, rois((0, 1, 1, 6, 6)), trans, **options)
    still = deform_psroi_pool(image, rois((0, 1, 1, 6, 6)), **options)
    changed = moved != still
    assert changed[0, 0, 2, 2] and changed.sum() == 1


# --- empty roi sets ----------------------------------------------------------------------------

EMPTY_CASES = [
    (roi_align, roi_align_backward, {"output_size": (2, 3)}, 4),
    (roi_align, roi_align_backward, {"output_size": 2, "mode": "max"}, 4),
    (roi_pool, roi_pool_backward, {"output_size": (2, 3)}, 4),
    (ps_roi_align, ps_roi_align_backward, {"output_size": (2, 1)}, 2),
    (ps_roi_pool, ps_roi_pool_backward, {"output_size": (1, 2)}, 2),
    (deform_roi_pool, deform_roi_pool_backward, {"output_size": (2, 3)}, 4),
    (deform_psroi_pool, deform_psroi_pool_backward, {"output_dim": 1, "group_size": 2,
                                                     "pooled_size": 3}, 1),
]


@pytest.mark.parametrize("forward, backward, options, out_channels", EMPTY_CASES,
                         ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(EMPTY_CASES)])
@pytest.mark.parametrize("empty", [np.zeros((0, 5)), [], [np.zeros((0, 4))]],
                         ids=["array", "list", "list-of-empty"])
def test_no_rois(forward, backward, options, out_channels, empty):
    image = np.ones((1, 4, 5, 5))
    out = forward(image, empty, **options)
    pooled = options.get("output_size", options.get("pooled_size"))
    assert out.shape == (0, out_channels) + (pooled if isinstance(pooled, tuple) else (pooled,) * 2)
    grads = backward(out, image, empty, **options)
    assert grads["input"].shape == image.shape and not grads["input"].any()


# --- backward against finite differences -------------------------------------------------------

def on_fractions(rng, shape, low, high):
    """Positions an integer in [low, high) plus a fraction in [0.05, 0.45] or [0.55, 0.95]: away
    from the kinks of rule B (integers) and from deform_psroi_pool's skip edges (halves)."""
    fraction = rng.uniform(0.05, 0.45, shape) + 0.5 * rng.integers(0, 2, shape)
    return rng.integers(low, high, shape) + fraction


def deform_roi_pool_problem(rng, with_mask):
    """Three rois whose sample step is one pixel (rw = rh = 4 = 2 bins * 2 samples), with
    offsets that put each bin's first sample, hence all its samples, on an integer plus a
    fraction; the samples reach outside the 6 x 7 image, into its clamped border and inside."""
    gamma, pooled, boxes = 0.1, 2, rois((0, 0.3, 1.2, 4.3, 5.2), (1, 2.7, -1.1, 6.7, 2.9),
                                         (1, -2.4, 3.6, 1.6, 7.6))
    first_y, first_x = (on_fractions(rng, (3, pooled, pooled), -3, size + 1) for size in (6, 7))
    bins = np.arange(pooled) * 2 + 0.5
    offset_x = (first_x - (boxes[:, 1, None, None] - 0.5) - bins[None, None, :]) / (gamma * 4)
    offset_y = (first_y - (boxes[:, 2, None, None] - 0.5) - bins[None, :, None]) / (gamma * 4)
    arrays = {"input": rng.standard_normal((2, 3, 6, 7)),
              "offset": np.stack([offset_x, offset_y], axis=1)}
    if with_mask:
        arrays["mask"] = rng.uniform(-0.5, 1.5, (3, 1, pooled, pooled))
    return arrays, {"rois": boxes, "output_size": pooled, "sampling_ratio": 2, "gamma": gamma}


def deform_psroi_pool_problem(rng):
    """Rois of 2 bins * 3 samples one pixel apart (integer boxes, rw = rh = 6), two classes, and
    a trans that puts each bin's first sample on an integer plus a fraction."""
    boxes = rois((0, 1, 0, 6, 5), (1, -3, 2, 2, 7), (0, 4, -2, 9, 3))
    pooled, trans_std = 2, 0.2
    starts = [on_fractions(rng, (3, 2, pooled, pooled), -3, size + 1) for size in (7, 8)]
    bins = np.arange(pooled) * 3
    trans_x = (starts[1] - (boxes[:, 1, None, None, None] - 0.5) - bins) / (trans_std * 6)
    trans_y = (starts[0] - (boxes[:, 2, None, None, None] - 0.5) - bins[:, None]) / (trans_std * 6)
    trans = np.stack([trans_x, trans_y], axis=2).reshape(3, 4, pooled, pooled)
    arrays = {"input": rng.standard_normal((2, 4 * 4, 7, 8)), "trans": trans}
    return arrays, {"rois": boxes, "output_dim": 4, "group_size": 2, "pooled_size": pooled,
                    "sample_per_part": 3, "trans_std": trans_std}


def random_rois(rng, count, batch, height, width):
    """Rois of any size, partly or wholly outside an image of the given size, some degenerate."""
    corners = rng.uniform(-4, 4, (count, 2)) + rng.uniform(0, [width, height], (count, 2))
    sizes = rng.uniform(-1, 8, (count, 2))
    return np.column_stack([rng.integers(0, batch, count), corners, corners + sizes])


def random_problem(rng, channels, options):
    arrays = {"input": rng.standard_normal((2, channels, 9, 8))}
    return arrays, {"rois": random_rois(rng, 5, 2, 9, 8), **options}


GRADIENT_CASES = {
    "roi_align-avg": (roi_align, roi_align_backward, lambda rng: random_problem(
        rng, 3, {"output_size": (2, 3), "spatial_scale": 0.75})),
    "roi_align-avg-aligned": (roi_align, roi_align_backward, lambda rng: random_problem(
        rng, 3, {"output_size": 3, "sampling_ratio": 2, "aligned": True})),
    "roi_align-max": (roi_align, roi_align_backward, lambda rng: random_problem(
        rng, 3, {"output_size": (3, 2), "mode": "max"})),
    "roi_align-max-aligned": (roi_align, roi_align_backward, lambda rng: random_problem(
        rng, 3, {"output_size": 2, "sampling_ratio": 3, "aligned": True, "mode": "max"})),
    "roi_pool": (roi_pool, roi_pool_backward, lambda rng: random_problem(
        rng, 3, {"output_size": (3, 2), "spatial_scale": 0.5})),
    "ps_roi_align": (ps_roi_align, ps_roi_align_backward, lambda rng: random_problem(
        rng, 12, {"output_size": (2, 3)})),
    "ps_roi_pool": (ps_roi_pool, ps_roi_pool_backward, lambda rng: random_problem(
        rng, 12, {"output_size": (3, 2)})),
    "deform_roi_pool": (deform_roi_pool, deform_roi_pool_backward,
                        lambda rng: deform_roi_pool_problem(rng, with_mask=False)),
    "deform_roi_pool-mask": (deform_roi_pool, deform_roi_pool_backward,
                             lambda rng: deform_roi_pool_problem(rng, with_mask=True)),
    "deform_psroi_pool": (deform_psroi_pool, deform_psroi_pool_backward, deform_psroi_pool_problem),
    "deform_psroi_pool-no-trans": (deform_psroi_pool, deform_psroi_pool_backward, lambda rng: (
        {"input": rng.standard_normal((2, 9, 7, 8))},
        {"rois": random_rois(rng, 4, 2, 7, 8), "output_dim": 1, "group_size": 3,
         "pooled_size": 3, "sample_per_part": 2})),
}
GRADIENT_ARGUMENTS = [(case, name) for case in GRADIENT_CASES
                      for name in ("input", "offset", "mask", "trans")
                      if name in GRADIENT_CASES[case][2](np.random.default_rng(0))[0]]


@pytest.mark.parametrize("case, name", GRADIENT_ARGUMENTS,
                         ids=[f"{case}-{name}" for case, name in GRADIENT_ARGUMENTS])
def test_directional_derivatives(case, name):
    """<grad, v> equals the central difference of <grad_output, forward> along a random v."""
    forward, backward, problem = GRADIENT_CASES[case]
    rng = np.random.default_rng(sorted(GRADIENT_CASES).index(case))
    arrays, options = problem(rng)
    grad_output = rng.standard_normal(forward(**arrays, **options).shape)
    direction = rng.standard_normal(arrays[name].shape)
    grads = backward(grad_output, **arrays, **options)
    assert all(grads[other] is None for other in ("offset", "mask", "trans")
               if other in grads and other not in arrays)
    analytic = np.sum(grads[name] * direction)

    def loss(step):
        moved = {**arrays, name: arrays[name] + step * direction}
        return np.sum(grad_output * forward(**moved, **options))

    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_max_modes_propagate_nan():
    """roi_pool and roi_align(mode="max"): a NaN in a bin makes its output NaN, and the gradient
    goes to the first NaN (NumPy's max and argmax)."""
    import reference

    from tests.roi_kernel_set_checks import check_max_modes_propagate_nan

    check_max_modes_propagate_nan(np.float64, module=reference)
