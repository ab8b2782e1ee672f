"""CenterNet's selftest checks: the decode of planted peaks returns them in order with their
boxes, the targets of hand-worked boxes fill the slots and put 1 at the centres, the focal loss
equals the formula and its gradient finite differences."""

from __future__ import annotations

import numpy as np

from ..centernet import centernet_decode, centernet_focal_loss, centernet_focal_loss_backward, centernet_targets
from .common import (
    FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCE_TOLERANCE, OUTPUT_TOLERANCE, below_float64, check, float64_only,
    gpu_only, numba_cpu, on_device, relative_error, rounded, same_backend,
)

#
# Heat values lie on a 1/64 grid in [0, 1), exact in every dtype (bfloat16 keeps 8 significant
# bits), so runs in different dtypes rank the same scores. Planted peaks take values in [1/2, 1)
# on a lattice 3 pixels apart: each is the strict maximum of its 3x3 window and above every
# background value (< 1/4), so the top-K are the planted peaks in decreasing order.

HEAT_GRID = 64
CENTERNET_SHAPE = (2, 3, 9, 12)  # B, C, H, W


def _centernet_heat(rng, planted: bool):
    """(heat, peaks): background on the grid in [0, 1/4); with ``planted``, one peak per lattice
    point of each image, (b, value, c, y, x) rows in decreasing value order per image."""
    batch, classes, height, width = CENTERNET_SHAPE
    heat = rng.integers(0, HEAT_GRID // 4, CENTERNET_SHAPE) / HEAT_GRID
    peaks = []
    if planted:
        sites = [(c, y, x) for c in range(classes) for y in range(1, height, 3) for x in range(1, width, 3)]
        for b in range(batch):
            values = (HEAT_GRID // 2 + rng.permutation(HEAT_GRID // 2)[:len(sites)]) / HEAT_GRID
            for value, (c, y, x) in sorted(zip(values, sites), reverse=True):
                heat[b, c, y, x] = value
                peaks.append((b, value, c, y, x))
    return heat, peaks


def _centernet_decode_arrays(rng, planted):
    batch, classes, height, width = CENTERNET_SHAPE
    heat, peaks = _centernet_heat(rng, planted)
    arrays = {"heat": heat, "wh": rng.uniform(1.0, 9.0, (batch, 2 * classes, height, width)),
              "reg": rng.uniform(0.0, 1.0, (batch, 2, height, width))}
    return arrays, peaks


def _decode(backend, dtype, arrays, **options):
    """(float64 detections of ``backend`` in ``dtype`` on the arguments rounded to it, the
    rounded arguments)."""
    arrays = rounded(arrays, dtype)
    out = centernet_decode(**on_device(backend, dtype, arrays), **options, backend=backend.option)
    return backend.to_host(out), arrays


def _detections_error(actual, expected) -> float:
    """Relative box error; infinite when a score or class differs (those are exact)."""
    if not np.array_equal(actual[..., 4:], expected[..., 4:]):
        return float("inf")
    return relative_error(actual[..., :4], expected[..., :4])


DECODE_OPTIONS = ({"K": 30, "cat_spec_wh": True, "down_ratio": 4.0},
                  {"K": 500, "kernel": 5, "threshold": 0.3})


@check("centernet_decode", "planted peaks = top-K", OUTPUT_TOLERANCE)
def _planted_peaks(backend, dtype, quick):
    arrays, peaks = _centernet_decode_arrays(np.random.default_rng(40), planted=True)
    batch = CENTERNET_SHAPE[0]
    k = len(peaks) // batch
    actual, arrays = _decode(backend, dtype, arrays, K=k, cat_spec_wh=True, down_ratio=2.0)
    expected = np.zeros((batch, k, 6))
    for row, (b, value, c, y, x) in enumerate(peaks):
        xs, ys = x + arrays["reg"][b, 0, y, x], y + arrays["reg"][b, 1, y, x]
        w, h = arrays["wh"][b, 2 * c, y, x], arrays["wh"][b, 2 * c + 1, y, x]
        expected[b, row % k] = (2 * (xs - w / 2), 2 * (ys - h / 2), 2 * (xs + w / 2), 2 * (ys + h / 2), value, c)
    return _detections_error(actual, expected)


def _decode_against(reference_backend):
    def run(backend, dtype, quick):
        errors = []
        for index, options in enumerate(DECODE_OPTIONS[:1] if quick else DECODE_OPTIONS):
            arrays, _ = _centernet_decode_arrays(np.random.default_rng(41 + index), planted=index == 0)
            if not options.get("cat_spec_wh"):
                arrays["wh"] = arrays["wh"][:, :2]
            actual, rounded = _decode(backend, dtype, arrays, **options)
            expected, _ = _decode(reference_backend(backend), "float64", rounded, **options)
            errors.append(_detections_error(actual, expected))
        return max(errors)

    return run


check("centernet_decode", "vs float64", OUTPUT_TOLERANCE, below_float64)(_decode_against(same_backend))
check("centernet_decode", "vs numba-cpu float64", OUTPUT_TOLERANCE, gpu_only)(_decode_against(numba_cpu))


def _boxes_dtype(backend, dtype):
    """The targets take float32 or float64 boxes."""
    return dtype in ("float32", "float64")


# Boxes in input pixels (down_ratio 4) on a 16 x 20 grid: (x1, y1, x2, y2), clipped sizes (w, h)
# and centres worked out by hand; the third reaches past the right and bottom borders (clipped
# to 19 and 15), the fourth has zero width, the fifth is padding.
TARGET_BOXES = [[4, 8, 36, 28], [40, 2, 58, 50], [50, 30, 100, 90], [10, 10, 10, 30], [0, 0, 0, 0]]
TARGET_LABELS = [1, 0, 1, 2, -1]
TARGET_SLOTS = [  # w, h, centre x, centre y
    (8.0, 5.0, 5.0, 4.5), (4.5, 12.0, 12.25, 6.5), (6.5, 7.5, 15.75, 11.25), None, None]


@check("centernet_targets", "slots and peaks by hand", OUTPUT_TOLERANCE, _boxes_dtype)
def _targets_by_hand(backend, dtype, quick):
    boxes = backend.to_device(np.array([TARGET_BOXES], dtype=np.float64), dtype)
    labels = backend.xp.asarray(np.array([TARGET_LABELS]))
    out = centernet_targets(boxes, labels, 3, (16, 20), max_objects=6, backend=backend.option)
    heatmap, wh, reg = (backend.to_host(a)[0] for a in out[:3])
    ind, reg_mask = (backend.to_host(a)[0] for a in out[3:])
    expected = np.zeros((6, 6))  # w, h, reg x, reg y, ind, mask
    peaks = []
    for m, slot in enumerate(TARGET_SLOTS):
        if slot is not None:
            w, h, cx, cy = slot
            expected[m] = (w, h, cx % 1, cy % 1, int(cy) * 20 + int(cx), 1)
            peaks.append(heatmap[TARGET_LABELS[m], int(cy), int(cx)])
    actual = np.column_stack([wh, reg, ind, reg_mask])
    errors = [relative_error(actual, expected), max(abs(p - 1.0) for p in peaks), max(0.0, heatmap.max() - 1.0)]
    # Nothing drawn for the empty box (class 2) and nothing outside [0, 1].
    errors.append(float(np.abs(heatmap[2]).max()) + max(0.0, -heatmap.min()))
    return max(errors)


@check("centernet_targets", "float32 vs float64", OUTPUT_TOLERANCE, lambda backend, dtype: dtype == "float32")
def _targets_float32(backend, dtype, quick):
    rng = np.random.default_rng(42)
    corners = np.round(rng.uniform(0, 60, (2, 8, 2)) * 4) / 4
    boxes = np.concatenate([corners, corners + np.round(rng.uniform(2, 40, (2, 8, 2)) * 4) / 4], axis=2)
    labels = backend.xp.asarray(rng.integers(-1, 4, (2, 8)))
    runs = [centernet_targets(backend.to_device(boxes, d), labels, 4, (16, 16), backend=backend.option)
            for d in (dtype, "float64")]
    return max(relative_error(backend.to_host(a), backend.to_host(b)) for a, b in zip(*runs))


def _focal_arrays(rng):
    """Predictions on a 1/64 grid inside the clamp bounds, targets with exact ones."""
    pred = rng.integers(1, HEAT_GRID, (2, 3, 8, 8)) / HEAT_GRID
    target = rng.integers(0, HEAT_GRID, pred.shape) / HEAT_GRID
    target.reshape(-1)[rng.permutation(target.size)[:5]] = 1.0
    return pred, target


def numpy_focal_loss(pred, target, alpha=2.0, beta=4.0) -> float:
    """The CenterNet focal loss in float64 NumPy (docs/centernet.md), predictions inside the clamp bounds."""
    positive = target == 1
    pos = np.where(positive, -np.log(pred) * (1 - pred) ** alpha, 0).sum()
    neg = np.where(positive, 0, -np.log(1 - pred) * pred ** alpha * (1 - target) ** beta).sum()
    return (pos + neg) / max(int(positive.sum()), 1)


@check("centernet_focal_loss", "loss = NumPy formula", OUTPUT_TOLERANCE)
def _focal_loss_formula(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(43))
    loss = centernet_focal_loss(backend.to_device(pred, dtype), backend.to_device(target, dtype),
                                backend=backend.option)
    return relative_error(backend.to_host(loss), np.asarray(numpy_focal_loss(pred, target)))


def _focal_grad(backend, dtype, pred, target, grad_output=1.5):
    grad = centernet_focal_loss_backward(backend.to_device(np.array(grad_output), dtype),
                                         backend.to_device(pred, dtype), backend.to_device(target, dtype),
                                         backend=backend.option)
    return backend.to_host(grad)


@check("centernet_focal_loss", "grad pred vs finite difference", FINITE_DIFFERENCE_TOLERANCE, float64_only)
def _focal_grad_finite_difference(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(44))
    direction = np.random.default_rng(45).standard_normal(pred.shape)
    h = FINITE_DIFFERENCE_STEP
    numeric = 1.5 * (numpy_focal_loss(pred + h * direction, target) - numpy_focal_loss(pred - h * direction, target))
    gradient = _focal_grad(backend, dtype, pred, target) * direction
    return abs(numeric / (2 * h) - gradient.sum()) / np.abs(gradient).sum()


@check("centernet_focal_loss", "grad vs float64", OUTPUT_TOLERANCE, below_float64)
def _focal_grad_float64(backend, dtype, quick):
    pred, target = _focal_arrays(np.random.default_rng(46))
    return relative_error(_focal_grad(backend, dtype, pred, target), _focal_grad(backend, "float64", pred, target))
