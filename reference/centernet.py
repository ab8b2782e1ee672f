"""CenterNet ("Objects as Points"), docs/centernet.md, in float64: heatmap decoding, the
training targets, and the penalty-reduced focal loss with its analytic gradient.

Shapes: heat [B, C, H, W]; wh [B, 2, H, W] or [B, 2C, H, W] (class-specific sizes, class c's
(w, h) in channels 2c, 2c + 1); reg [B, 2, H, W] or None; detections [B, K, 6] with columns
x1, y1, x2, y2, score, class. Targets: boxes [B, M, 4] (x1, y1, x2, y2 in input pixels),
labels [B, M] (-1 = padding); heatmap [B, num_classes, out_h, out_w], wh / reg
[B, max_objects, 2], ind [B, max_objects] int64, reg_mask [B, max_objects] uint8.

Choices the original code leaves open (pydeform's decisions, documented in docs/centernet.md):
- A NaN heat value is never a peak and never a neighbourhood maximum: the peak test reads it as
  -inf, and its kept score is 0.
- Slots k >= C*H*W (K larger than the number of scores) are (0, 0, 0, 0, 0, -1).
- ``threshold``: a detection whose score is below it gets score 0 and class -1; its box stays.
- Targets: object m uses slot m; objects m >= max_objects, padding (label < 0) and objects whose
  clipped box has h <= 0 or w <= 0 leave their slot zero.
- Focal loss: target values y > 1 are neither positive (y == 1) nor negative (y < 1) and add
  nothing. The clamp of p to [1e-4, 1 - 1e-4] passes the gradient only where it does not act
  (bounds included), torch.clamp's rule.
"""

import math
from typing import NamedTuple

import numpy as np

CLAMP_LOW = 1e-4
CLAMP_HIGH = 1.0 - 1e-4


def peak_scores(heat, kernel=3):
    """Scores after the peak test: heat where it equals the max of its kernel x kernel window
    (outside the map = -inf, NaN = -inf), else 0. heat [B, C, H, W] -> float64 [B, C, H, W]."""
    heat = np.asarray(heat, dtype=np.float64)
    assert kernel >= 1 and kernel % 2 == 1, kernel
    half = kernel // 2
    height, width = heat.shape[2:]
    comparable = np.where(np.isnan(heat), -np.inf, heat)
    padded = np.pad(comparable, ((0, 0), (0, 0), (half, half), (half, half)), constant_values=-np.inf)
    window_max = np.full(heat.shape, -np.inf)
    for dy in range(kernel):
        for dx in range(kernel):
            np.maximum(window_max, padded[:, :, dy:dy + height, dx:dx + width], out=window_max)
    peak = ~np.isnan(heat) & (heat == window_max)
    return np.where(peak, heat, 0.0)


def top_k(scores, K):
    """Per image, the flat indices c*H*W + y*W + x of the K best scores, best first, equal scores
    in increasing index order. scores [B, C, H, W] -> int64 [B, min(K, C*H*W)]."""
    flat = scores.reshape(scores.shape[0], int(np.prod(scores.shape[1:])))
    index = np.arange(flat.shape[1])
    rows = [np.lexsort((index, -row))[:K] for row in flat]
    return np.array(rows, dtype=np.int64).reshape(flat.shape[0], min(K, flat.shape[1]))


def centernet_decode(heat, wh, reg=None, K=100, kernel=3, cat_spec_wh=False, down_ratio=1.0,
                     threshold=None):
    """CenterNet detections: float64 [B, K, 6], rows (x1, y1, x2, y2, score, class)."""
    heat = np.asarray(heat, dtype=np.float64)
    wh = np.asarray(wh, dtype=np.float64)
    batch, classes, height, width = heat.shape
    assert wh.shape == (batch, 2 * classes if cat_spec_wh else 2, height, width), wh.shape
    if reg is not None:
        reg = np.asarray(reg, dtype=np.float64)
        assert reg.shape == (batch, 2, height, width), reg.shape
    scores = peak_scores(heat, kernel)
    detections = np.zeros((batch, K, 6))
    detections[:, :, 5] = -1.0
    chosen = top_k(scores, K)
    for b in range(batch):
        for k, index in enumerate(chosen[b]):
            c, rest = divmod(int(index), height * width)
            y, x = divmod(rest, width)
            if reg is None:
                xs, ys = x + 0.5, y + 0.5
            else:
                xs, ys = x + reg[b, 0, y, x], y + reg[b, 1, y, x]
            size_channel = 2 * c if cat_spec_wh else 0
            w, h = wh[b, size_channel, y, x], wh[b, size_channel + 1, y, x]
            box = np.array([xs - w / 2, ys - h / 2, xs + w / 2, ys + h / 2]) * down_ratio
            score = scores[b, c, y, x]
            label = float(c)
            if threshold is not None and score < threshold:
                score, label = 0.0, -1.0
            detections[b, k] = (*box, score, label)
    return detections


def gaussian_radius(height, width, min_overlap):
    """The original training code's radius: the smallest root of three quadratics (docs/centernet.md)."""
    o = min_overlap
    b1 = height + width
    c1 = width * height * (1 - o) / (1 + o)
    r1 = (b1 + math.sqrt(b1 * b1 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - o) * width * height
    r2 = (b2 + math.sqrt(b2 * b2 - 16 * c2)) / 2
    b3 = -2 * o * (height + width)
    c3 = (o - 1) * width * height
    r3 = (b3 + math.sqrt(b3 * b3 - 16 * o * c3)) / 2
    return min(r1, r2, r3)


def gaussian_patch(radius):
    """float64 [2r+1, 2r+1]: exp(-(dx^2 + dy^2) / (2 sigma^2)), sigma = (2r+1) / 6, entries below
    eps * max set to 0."""
    sigma = (2 * radius + 1) / 6
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    patch = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma * sigma))
    patch[patch < np.finfo(np.float64).eps * patch.max()] = 0.0
    return patch


class CenterNetTargets(NamedTuple):
    heatmap: np.ndarray
    wh: np.ndarray
    reg: np.ndarray
    ind: np.ndarray
    reg_mask: np.ndarray


def centernet_targets(boxes, labels, num_classes, output_size, down_ratio=4, min_overlap=0.7,
                      max_objects=128):
    """Training targets of a padded batch (docs/centernet.md); output_size is an int or (out_h, out_w)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    labels = np.asarray(labels)
    out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    batch, objects = labels.shape
    assert boxes.shape == (batch, objects, 4), boxes.shape
    heatmap = np.zeros((batch, num_classes, out_h, out_w))
    wh = np.zeros((batch, max_objects, 2))
    reg = np.zeros((batch, max_objects, 2))
    ind = np.zeros((batch, max_objects), dtype=np.int64)
    reg_mask = np.zeros((batch, max_objects), dtype=np.uint8)
    for b in range(batch):
        for m in range(min(objects, max_objects)):
            label = int(labels[b, m])
            if label < 0:
                continue
            assert label < num_classes, label
            x1, y1, x2, y2 = boxes[b, m] / down_ratio
            x1, x2 = np.clip([x1, x2], 0, out_w - 1)
            y1, y2 = np.clip([y1, y2], 0, out_h - 1)
            h, w = y2 - y1, x2 - x1
            if not (h > 0 and w > 0):
                continue
            radius = max(0, int(gaussian_radius(math.ceil(h), math.ceil(w), min_overlap)))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = int(cx), int(cy)
            patch = gaussian_patch(radius)
            top, bottom = min(iy, radius), min(out_h - iy, radius + 1)
            left, right = min(ix, radius), min(out_w - ix, radius + 1)
            region = heatmap[b, label, iy - top:iy + bottom, ix - left:ix + right]
            np.maximum(region, patch[radius - top:radius + bottom, radius - left:radius + right], out=region)
            wh[b, m] = (w, h)
            ind[b, m] = iy * out_w + ix
            reg[b, m] = (cx - ix, cy - iy)
            reg_mask[b, m] = 1
    return CenterNetTargets(heatmap, wh, reg, ind, reg_mask)


def _focal_terms(pred, target, beta):
    """(clamped p, positive mask y == 1, negative weight (1 - y)^beta where y < 1 else 0)."""
    p = np.clip(np.asarray(pred, dtype=np.float64), CLAMP_LOW, CLAMP_HIGH)
    y = np.asarray(target, dtype=np.float64)
    assert np.all((y >= 0) & (y <= 1)), "target values outside [0, 1]"
    negative = y < 1
    neg_weight = np.where(negative, (1 - np.where(negative, y, 0.0)) ** beta, 0.0)
    return p, y == 1, neg_weight


def centernet_focal_loss(pred, target, alpha=2, beta=4):
    """Penalty-reduced pixel-wise focal loss (docs/centernet.md): a float64 scalar."""
    p, positive, neg_weight = _focal_terms(pred, target, beta)
    pos = np.where(positive, -np.log(p) * (1 - p) ** alpha, 0.0).sum()
    neg = (-np.log(1 - p) * p ** alpha * neg_weight).sum()
    return (pos + neg) / max(int(positive.sum()), 1)


def centernet_focal_loss_backward(grad_output, pred, target, alpha=2, beta=4):
    """Gradient of centernet_focal_loss with respect to pred: float64 like pred."""
    pred = np.asarray(pred, dtype=np.float64)
    p, positive, neg_weight = _focal_terms(pred, target, beta)
    # d/dp of -log(p) (1-p)^a and of -log(1-p) p^a (1-y)^b.
    d_pos = -(1 - p) ** alpha / p + alpha * np.log(p) * (1 - p) ** (alpha - 1)
    d_neg = (p ** alpha / (1 - p) - alpha * np.log(1 - p) * p ** (alpha - 1)) * neg_weight
    d_p = np.where(positive, d_pos, 0.0) + d_neg
    passes = (pred >= CLAMP_LOW) & (pred <= CLAMP_HIGH)
    scale = float(np.asarray(grad_output, dtype=np.float64).reshape(())) / max(int(positive.sum()), 1)
    return np.where(passes, d_p * scale, 0.0)
