"""The reference CenterNet ops (docs/centernet.md): decode against hand-built heatmaps and
an independent formulation, targets against a per-object rendering written here, the focal loss
gradient against float64 finite differences."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import reference
from reference import centernet_decode, centernet_focal_loss, centernet_focal_loss_backward, centernet_targets
from reference.centernet import gaussian_radius
from tests.centernet_cases import build_decode_case, build_focal_case, build_targets_case

EMPTY_SLOT = [0, 0, 0, 0, 0, -1]


def sizes(batch, height, width, w=2.0, h=4.0):
    """A wh map [B, 2, H, W] of constant size (w, h)."""
    wh = np.empty((batch, 2, height, width))
    wh[:, 0], wh[:, 1] = w, h
    return wh


# --- decode: hand-built heatmaps ---------------------------------------------------------------

def test_planted_peaks_in_score_order_with_boxes():
    heat = np.full((1, 2, 5, 6), 0.1)
    heat[0, 0, 1, 2] = 0.9
    heat[0, 1, 3, 4] = 0.7
    heat[0, 0, 4, 0] = 0.5
    reg = np.zeros((1, 2, 5, 6))
    reg[0, :, 3, 4] = (0.25, 0.75)
    out = centernet_decode(heat, sizes(1, 5, 6), reg, K=3)
    np.testing.assert_allclose(out[0], [
        [2 - 1, 1 - 2, 2 + 1, 1 + 2, 0.9, 0],
        [4.25 - 1, 3.75 - 2, 4.25 + 1, 3.75 + 2, 0.7, 1],
        [0 - 1, 4 - 2, 0 + 1, 4 + 2, 0.5, 0],
    ])


def test_without_reg_the_centre_is_the_pixel_centre_and_down_ratio_scales():
    heat = np.zeros((1, 1, 3, 3))
    heat[0, 0, 1, 2] = 1.0
    out = centernet_decode(heat, sizes(1, 3, 3, w=1.0, h=3.0), None, K=1, down_ratio=4.0)
    np.testing.assert_allclose(out[0, 0], [(2.5 - 0.5) * 4, (1.5 - 1.5) * 4, (2.5 + 0.5) * 4, (1.5 + 1.5) * 4, 1, 0])


def test_plateau_keeps_every_equal_maximum_in_index_order():
    heat = np.zeros((1, 1, 4, 4))
    heat[0, 0, 1, 1:3] = 0.8  # two equal neighbours: both peaks
    heat[0, 0, 3, 3] = 0.6
    out = centernet_decode(heat, sizes(1, 4, 4), None, K=3)
    np.testing.assert_array_equal(out[0, :, 4], [0.8, 0.8, 0.6])
    np.testing.assert_array_equal((out[0, :, 0] + out[0, :, 2]) / 2, [1.5, 2.5, 3.5])


def test_a_smaller_neighbour_of_a_peak_is_suppressed_but_not_one_outside_the_window():
    heat = np.zeros((1, 1, 1, 5))
    heat[0, 0, 0] = (0.9, 0.8, 0.7, 0.6, 0.65)
    out = centernet_decode(heat, sizes(1, 1, 5), None, K=2, kernel=3)
    np.testing.assert_array_equal(out[0, :, 4], [0.9, 0.65])
    out = centernet_decode(heat, sizes(1, 1, 5), None, K=2, kernel=1)  # every pixel is a peak
    np.testing.assert_array_equal(out[0, :, 4], [0.9, 0.8])
    out = centernet_decode(heat, sizes(1, 1, 5), None, K=2, kernel=5)  # 0.65 sees 0.7 at distance 2
    np.testing.assert_array_equal(out[0, :, 4], [0.9, 0.0])


def test_peaks_on_the_borders_and_corners():
    heat = np.full((1, 1, 4, 5), 0.2)
    heat[0, 0, 0, 0], heat[0, 0, 3, 4], heat[0, 0, 0, 4], heat[0, 0, 2, 0] = 0.9, 0.8, 0.7, 0.6
    out = centernet_decode(heat, sizes(1, 4, 5), None, K=4)
    np.testing.assert_array_equal(out[0, :, 4], [0.9, 0.8, 0.7, 0.6])
    centres = np.stack([(out[0, :, 0] + out[0, :, 2]) / 2, (out[0, :, 1] + out[0, :, 3]) / 2], axis=1)
    np.testing.assert_array_equal(centres, [[0.5, 0.5], [4.5, 3.5], [4.5, 0.5], [0.5, 2.5]])


def test_fewer_peaks_than_K_fill_with_zero_scores_at_the_lowest_indices():
    heat = np.zeros((1, 2, 2, 2))
    heat[0, 1, 1, 1] = 0.5
    out = centernet_decode(heat, sizes(1, 2, 2), None, K=3)
    # The peak, then the zero scores of flat indices 0 and 1 (class 0, pixels (0, 0), (0, 1)).
    np.testing.assert_array_equal(out[0, :, 4:], [[0.5, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(out[0, :, 0] + 1, [1.5, 0.5, 1.5])


def test_equal_scores_across_classes_go_by_class_then_position():
    heat = np.zeros((1, 3, 3, 3))
    heat[0, 2, 0, 0] = heat[0, 0, 2, 2] = heat[0, 1, 1, 1] = 0.7
    out = centernet_decode(heat, sizes(1, 3, 3), None, K=3)
    np.testing.assert_array_equal(out[0, :, 5], [0, 1, 2])


def test_class_specific_sizes_read_the_class_pair():
    heat = np.zeros((1, 2, 3, 3))
    heat[0, 1, 1, 1] = 1.0
    wh = np.zeros((1, 4, 3, 3))
    wh[0, :, 1, 1] = (10, 20, 2, 6)  # class 0 (10, 20), class 1 (2, 6)
    out = centernet_decode(heat, wh, None, K=1, cat_spec_wh=True)
    np.testing.assert_allclose(out[0, 0], [0.5, -1.5, 2.5, 4.5, 1, 1])


def test_threshold_marks_low_scores_without_moving_boxes():
    heat = np.zeros((1, 1, 3, 3))
    heat[0, 0, 0, 0], heat[0, 0, 2, 2] = 0.9, 0.3
    plain = centernet_decode(heat, sizes(1, 3, 3), None, K=3)
    out = centernet_decode(heat, sizes(1, 3, 3), None, K=3, threshold=0.5)
    np.testing.assert_array_equal(out[..., :4], plain[..., :4])
    np.testing.assert_array_equal(out[0, :, 4:], [[0.9, 0], [0, -1], [0, -1]])
    at = centernet_decode(heat, sizes(1, 3, 3), None, K=1, threshold=0.9)  # not below: kept
    np.testing.assert_array_equal(at[0, 0, 4:], [0.9, 0])


def test_K_beyond_the_scores_gives_empty_slots_and_empty_shapes():
    heat = np.arange(4.0).reshape(1, 1, 2, 2)
    out = centernet_decode(heat, sizes(1, 2, 2), None, K=6)
    assert out.shape == (1, 6, 6)
    np.testing.assert_array_equal(out[0, 4:], [EMPTY_SLOT, EMPTY_SLOT])
    np.testing.assert_array_equal(out[0, :4, 4], [3, 0, 0, 0])
    assert centernet_decode(heat, sizes(1, 2, 2), None, K=0).shape == (1, 0, 6)
    assert centernet_decode(np.zeros((0, 1, 2, 2)), np.zeros((0, 2, 2, 2)), None, K=3).shape == (0, 3, 6)


def test_nan_is_never_a_peak_nor_a_neighbourhood_maximum():
    heat = np.zeros((1, 1, 1, 3))
    heat[0, 0] = (np.nan, 0.4, 0.2)
    out = centernet_decode(heat, sizes(1, 1, 3), None, K=3)
    np.testing.assert_array_equal(out[0, :, 4], [0.4, 0, 0])
    np.testing.assert_array_equal(out[0, :, 0] + 1, [1.5, 0.5, 2.5])  # 0.4, then NaN's 0 at index 0


# --- decode: an independent formulation --------------------------------------------------------

def decode_by_sorting(heat, wh, reg, K, kernel, cat_spec_wh, down_ratio, threshold):
    """Max filter over NumPy sliding windows, a stable argsort of all scores, gathers."""
    batch, classes, height, width = heat.shape
    half = kernel // 2
    comparable = np.nan_to_num(heat, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    padded = np.pad(comparable, ((0, 0), (0, 0), (half, half), (half, half)), constant_values=-np.inf)
    window_max = sliding_window_view(padded, (kernel, kernel), axis=(2, 3)).max(axis=(-2, -1))
    scores = np.where(heat == window_max, heat, 0.0).reshape(batch, -1)
    out = np.tile(np.array(EMPTY_SLOT, dtype=np.float64), (batch, K, 1))
    for b in range(batch):
        order = np.argsort(-scores[b], kind="stable")[:K]
        c, y, x = np.unravel_index(order, (classes, height, width))
        offset = (reg[b, 0, y, x], reg[b, 1, y, x]) if reg is not None else (0.5, 0.5)
        xs, ys = x + offset[0], y + offset[1]
        channel = 2 * c if cat_spec_wh else np.zeros_like(c)
        w, h = wh[b, channel, y, x], wh[b, channel + 1, y, x]
        score, label = scores[b, order], c.astype(np.float64)
        if threshold is not None:
            low = score < threshold
            score, label = np.where(low, 0.0, score), np.where(low, -1.0, label)
        boxes = np.stack([xs - w / 2, ys - h / 2, xs + w / 2, ys + h / 2], axis=1) * down_ratio
        out[b, :len(order)] = np.column_stack([boxes, score, label])
    return out


@given(seed=st.integers(0, 2**32 - 1), kernel=st.sampled_from([1, 3, 5]), cat_spec_wh=st.booleans(),
       with_reg=st.booleans(), extra_k=st.integers(-20, 4), threshold=st.sampled_from([None, 0.5]))
def test_decode_agrees_with_max_filter_and_stable_argsort(seed, kernel, cat_spec_wh, with_reg, extra_k, threshold):
    rng = np.random.default_rng(seed)
    size = tuple(rng.integers(1, 7, 2))
    classes = int(rng.integers(1, 4))
    K = max(0, classes * size[0] * size[1] + extra_k)
    case = build_decode_case(rng, np.float64, 2, classes, size, K, with_reg=with_reg, nan_fraction=0.1,
                             kernel=kernel, cat_spec_wh=cat_spec_wh, down_ratio=2.0, threshold=threshold)
    expected = decode_by_sorting(case.heat, case.wh, case.reg, K, kernel, cat_spec_wh, 2.0, threshold)
    np.testing.assert_array_equal(case.run(reference), expected)


# --- targets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, overlap, radius", [(10, 10, 0.7, 2), (4, 20, 0.7, 1), (50, 30, 0.7, 10),
                                                   (1, 1, 0.7, 0), (10, 10, 0.3, 4)])
def test_gaussian_radius_by_hand(h, w, overlap, radius):
    # e.g. h = w = 10, o = 0.7: r3 = (-28 + sqrt(28^2 + 16 * 0.7 * 30)) / 2 = 2.733 < r1, r2.
    assert max(0, int(gaussian_radius(h, w, overlap))) == radius


def render_targets(boxes, labels, num_classes, out_h, out_w, down_ratio, min_overlap, max_objects):
    """Per object, every pixel of the map: the Gaussian value where within the radius."""
    batch, objects = labels.shape
    heatmap = np.zeros((batch, num_classes, out_h, out_w))
    slots = np.zeros((batch, max_objects, 6))  # w, h, reg x, reg y, ind, mask
    ys, xs = np.mgrid[0:out_h, 0:out_w]
    for b in range(batch):
        for m in range(min(objects, max_objects)):
            if labels[b, m] < 0:
                continue
            x1, x2 = (min(max(v / down_ratio, 0), out_w - 1) for v in boxes[b, m, 0::2])
            y1, y2 = (min(max(v / down_ratio, 0), out_h - 1) for v in boxes[b, m, 1::2])
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                continue
            r = max(0, int(gaussian_radius(math.ceil(y2 - y1), math.ceil(x2 - x1), min_overlap)))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = math.floor(cx), math.floor(cy)
            sigma = (2 * r + 1) / 6
            near = (abs(xs - ix) <= r) & (abs(ys - iy) <= r)
            value = np.where(near, np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2)), 0)
            heatmap[b, labels[b, m]] = np.maximum(heatmap[b, labels[b, m]], value)
            slots[b, m] = (x2 - x1, y2 - y1, cx - ix, cy - iy, iy * out_w + ix, 1)
    return heatmap, slots


@given(seed=st.integers(0, 2**32 - 1), down_ratio=st.sampled_from([1.0, 4.0, 2.5]),
       min_overlap=st.sampled_from([0.7, 0.3]), max_objects=st.integers(1, 8))
def test_targets_agree_with_a_per_object_rendering(seed, down_ratio, min_overlap, max_objects):
    rng = np.random.default_rng(seed)
    case = build_targets_case(rng, np.float64, batch=2, objects=6, num_classes=2,
                              output_size=tuple(int(v) for v in rng.integers(1, 12, 2)), down_ratio=down_ratio,
                              min_overlap=min_overlap, max_objects=max_objects)
    got = case.reference()
    heatmap, slots = render_targets(case.boxes, case.labels, case.num_classes, *case.output_size, down_ratio,
                                    min_overlap, max_objects)
    np.testing.assert_allclose(got.heatmap, heatmap, rtol=1e-14, atol=0)
    np.testing.assert_allclose(got.wh, slots[..., 0:2], rtol=1e-14)
    np.testing.assert_allclose(got.reg, slots[..., 2:4], rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(got.ind, slots[..., 4])
    np.testing.assert_array_equal(got.reg_mask, slots[..., 5])
    assert got.ind.dtype == np.int64 and got.reg_mask.dtype == np.uint8


def test_targets_by_hand():
    # Box (4, 4, 30, 20) / 4 = (1, 1, 7.5, 5), x2 clipped to 7: w 6, h 4, centre (4, 3), radius 1.
    got = centernet_targets(np.array([[[4, 4, 30, 20], [9, 9, 9, 20]]], float), np.array([[1, 0]]), 2, (8, 8))
    heatmap = np.zeros((8, 8))
    heatmap[2:5, 3:6] = np.exp(-np.array([[2, 1, 2], [1, 0, 1], [2, 1, 2]]) / (2 * 0.5 ** 2))
    np.testing.assert_allclose(got.heatmap[0, 1], heatmap, rtol=1e-15)
    assert not got.heatmap[0, 0].any()  # the second box has w = 0
    np.testing.assert_array_equal(got.wh[0, :2], [[6, 4], [0, 0]])
    np.testing.assert_array_equal(got.ind[0, :2], [3 * 8 + 4, 0])
    np.testing.assert_array_equal(got.reg_mask[0, :2], [1, 0])


def test_overlapping_objects_keep_the_maximum_in_any_order():
    boxes = np.array([[[0, 0, 40, 40], [8, 8, 36, 44], [2, 0, 30, 12]]], float)
    labels = np.array([[0, 0, 0]])
    forward = centernet_targets(boxes, labels, 1, 12)
    backward = centernet_targets(boxes[:, ::-1], labels, 1, 12)
    np.testing.assert_array_equal(forward.heatmap, backward.heatmap)
    singles = [centernet_targets(boxes[:, m:m + 1], labels[:, :1], 1, 12).heatmap for m in range(3)]
    np.testing.assert_array_equal(forward.heatmap, np.maximum.reduce(singles))


# --- focal loss --------------------------------------------------------------------------------

def test_focal_loss_by_hand():
    pred = np.array([0.8, 0.25, 0.5]).reshape(1, 1, 1, 3)
    target = np.array([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    pos = -math.log(0.8) * 0.2 ** 2
    neg = -math.log(0.75) * 0.25 ** 2 * 0.5 ** 4 - math.log(0.5) * 0.5 ** 2
    assert centernet_focal_loss(pred, target) == pytest.approx(pos + neg, rel=1e-14)
    # No positives: the negatives' sum, not divided.
    assert centernet_focal_loss(pred[..., 1:], target[..., 1:]) == pytest.approx(neg, rel=1e-14)


@given(seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([2.0, 1.5, 0.0]), beta=st.sampled_from([4.0, 1.0]),
       positives=st.integers(0, 3))
def test_focal_loss_gradient_matches_finite_differences(seed, alpha, beta, positives):
    rng = np.random.default_rng(seed)
    case = build_focal_case(rng, np.float64, (1, 2, 3, 3), positives=positives, alpha=alpha, beta=beta)
    grad = centernet_focal_loss_backward(case.grad_output, case.pred, case.target, alpha, beta)
    direction = rng.standard_normal(case.pred.shape)
    clamped = (case.pred < 1e-4) | (case.pred > 1 - 1e-4)
    eps = 1e-6
    plus = centernet_focal_loss(case.pred + eps * direction, case.target, alpha, beta)
    minus = centernet_focal_loss(case.pred - eps * direction, case.target, alpha, beta)
    numeric = float(case.grad_output) * (plus - minus) / (2 * eps)
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    assert not grad[clamped].any()
    assert np.all(grad[~clamped] != 0)
