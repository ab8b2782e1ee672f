"""``python -m pydeform demo``: what the ops do, in one picture of a synthetic scene.

Four panels over a 128x128 image of three coloured shapes:

1. CenterNet: the shapes' boxes become training targets (:func:`pydeform.centernet_targets`),
   the target heatmap plus noise plays the network's output, and
   :func:`pydeform.centernet_decode` turns it back into boxes, scores and classes.
2. Deformable convolution: the 3x3 sampling points of a few output pixels, at rest (a regular
   grid) and moved by offsets that stretch them over the object under the pixel.
3. RoI Align: the bins of one detected box and the bilinear sampling points in each bin.
4. A morphological snake: :func:`pydeform.morphological_chan_vese` on the grey image, from a
   box inside the border, shrinking onto the shapes (its contour at a few iterations).

The sampling points are not drawn from formulas: they are what the ops compute on coordinate
images. Bilinear interpolation of an image whose value is its own y (or x) coordinate returns
the position it samples, so a deformable convolution whose weights pick one kernel point and
one coordinate channel outputs that point's position, and RoI Align with a 2x finer output and
one sample per bin outputs the sample positions of ``sampling_ratio=2``.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

import pydeform

IMAGE_SIZE = 128
DOWN_RATIO = 4
CLASS_NAMES = ("square", "disc", "bar")
CLASS_COLOURS = ((0.85, 0.2, 0.2), (0.2, 0.7, 0.3), (0.25, 0.35, 0.9))
# (class, x1, y1, x2, y2) in image pixels, a pixel covering [i, i + 1).
OBJECTS = ((0, 14.0, 18.0, 50.0, 54.0), (1, 70.0, 10.0, 118.0, 58.0), (2, 30.0, 80.0, 110.0, 104.0))
KERNEL = 3  # the deformable convolution's kernel size (pad 1, stride 1)
ROI_BINS = 4  # RoI Align output size of the drawn roi (sampling_ratio 2)
DPI = 90  # of the PNG
SNAKE_ITERATIONS, SNAKE_DRAWN = 60, (0, 10, 25, 60)  # MorphACWE iterations, those drawn
SNAKE_MARGIN = 4  # the snake starts as a box this many pixels inside the border


class Demo(NamedTuple):
    image: np.ndarray  # [H, W, 3] float in [0, 1]
    detections: np.ndarray  # [K, 6] (x1, y1, x2, y2, score, class), class -1: below threshold
    pixels: list  # (y, x) output pixels whose deformable sampling points are drawn
    regular_points: np.ndarray  # [P, 9, 2] (y, x) sampling points with zero offsets
    deformed_points: np.ndarray  # [P, 9, 2] with the drawn offsets
    roi: np.ndarray  # [4] the drawn box (x1, y1, x2, y2)
    roi_samples: np.ndarray  # [2*ROI_BINS, 2*ROI_BINS, 2] (y, x) RoI Align sampling points
    snake: dict  # {iteration: int8 [H, W] level set} of MorphACWE, for the SNAKE_DRAWN iterations


def object_masks() -> list:
    """The pixels of each of OBJECTS: [H, W] bool each."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    masks = []
    for label, x1, y1, x2, y2 in OBJECTS:
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        if CLASS_NAMES[label] == "disc":
            cy, cx, radius = (y1 + y2) / 2, (x1 + x2) / 2, (x2 - x1) / 2
            inside = (ys - cy) ** 2 + (xs - cx) ** 2 < radius**2
        masks.append(inside)
    return masks


def scene(rng) -> np.ndarray:
    """The image: a grey noisy background and the filled OBJECTS, [H, W, 3] float32."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 0.92, np.float32)
    image += rng.normal(0.0, 0.02, image.shape).astype(np.float32)
    for (label, *_), inside in zip(OBJECTS, object_masks()):
        image[inside] = CLASS_COLOURS[label]
    return np.clip(image, 0.0, 1.0)


def snake(image) -> dict:
    """MorphACWE on the grey of ``image`` from a box SNAKE_MARGIN pixels inside the border:
    {iteration: level set} for the iterations in SNAKE_DRAWN (taken by ``iter_callback``)."""
    start = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int8)
    start[SNAKE_MARGIN:-SNAKE_MARGIN, SNAKE_MARGIN:-SNAKE_MARGIN] = 1
    snapshots = {}

    def keep(level_set):
        if len(keep.seen) in SNAKE_DRAWN:
            snapshots[len(keep.seen)] = level_set
        keep.seen.append(None)

    keep.seen = []
    pydeform.morphological_chan_vese(image.mean(axis=2), SNAKE_ITERATIONS, start, smoothing=1, iter_callback=keep)
    return snapshots


def decode_scene(rng, K: int = 10, threshold: float = 0.3) -> np.ndarray:
    """Targets of OBJECTS, their heatmap over noise as the network output, decoded: [K, 6]."""
    boxes = np.array([[obj[1:] for obj in OBJECTS]], np.float32)
    labels = np.array([[obj[0] for obj in OBJECTS]], np.int64)
    size = IMAGE_SIZE // DOWN_RATIO
    targets = pydeform.centernet_targets(boxes, labels, len(CLASS_NAMES), size, down_ratio=DOWN_RATIO)
    # Background noise below the threshold; the objects' Gaussians (one peak each) on top.
    noise = rng.uniform(0.0, 0.2, targets.heatmap.shape)
    heat = np.maximum(0.9 * targets.heatmap, noise).astype(np.float32)
    # The network's size and offset maps are read at the peaks only: put each object's target
    # values at its centre cell, and a plausible size elsewhere.
    wh = np.full((1, 2, size * size), 4.0, np.float32)
    reg = np.full((1, 2, size * size), 0.5, np.float32)
    slots = targets.reg_mask[0].astype(bool)
    wh[0][:, targets.ind[0][slots]] = targets.wh[0][slots].T
    reg[0][:, targets.ind[0][slots]] = targets.reg[0][slots].T
    detections = pydeform.centernet_decode(
        heat, wh.reshape(1, 2, size, size), reg.reshape(1, 2, size, size), K,
        down_ratio=DOWN_RATIO, threshold=threshold,
    )
    return detections[0]


def _coordinate_planes(height: int, width: int) -> np.ndarray:
    """[1, 2, H, W]: channel 0 holds each pixel's y, channel 1 its x."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([ys, xs])[None]


def deform_sampling_points(pixels, offsets) -> np.ndarray:
    """The 3x3 sampling points (y, x) of ``pixels`` as pydeform.deform_conv2d reads them.

    ``offsets[p]`` is the [9, 2] (dy, dx) offset of each kernel point of pixel p. Output
    channel 2k + a of the convolution copies coordinate a at kernel point k: [P, 9, 2].
    """
    points = KERNEL * KERNEL
    offset = np.zeros((1, 2 * points, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for (y, x), pixel_offsets in zip(pixels, offsets):
        offset[0, 0::2, y, x] = pixel_offsets[:, 0]
        offset[0, 1::2, y, x] = pixel_offsets[:, 1]
    weight = np.zeros((2 * points, 2, KERNEL, KERNEL), np.float32)
    for k in range(points):
        for axis in range(2):
            weight[2 * k + axis, axis, k // KERNEL, k % KERNEL] = 1.0
    sampled = pydeform.deform_conv2d(_coordinate_planes(IMAGE_SIZE, IMAGE_SIZE), offset, weight, padding=KERNEL // 2)
    return np.stack([sampled[0, :, y, x].reshape(points, 2) for y, x in pixels])


def spreading_offsets(pixel, box) -> np.ndarray:
    """[9, 2] (dy, dx) offsets moving the 3x3 grid of ``pixel`` to a 3x3 grid spanning 80% of
    ``box`` (x1, y1, x2, y2), the way a trained DCN's points follow the object's extent."""
    y, x = pixel
    x1, y1, x2, y2 = box
    grid = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
    centre = np.array([(y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5], np.float32)
    half = 0.4 * np.array([y2 - y1, x2 - x1], np.float32)
    return centre + grid * half - (np.array([y, x], np.float32) + grid)


def roi_align_samples(roi) -> np.ndarray:
    """The (y, x) sampling points of roi_align(ROI_BINS x ROI_BINS, sampling_ratio=2,
    aligned=True) in ``roi``: [2*ROI_BINS, 2*ROI_BINS, 2] (a 2x finer output with one sample per
    bin samples exactly there)."""
    rois = np.array([[0, *roi]], np.float32)
    samples = pydeform.roi_align(_coordinate_planes(IMAGE_SIZE, IMAGE_SIZE), rois, 2 * ROI_BINS,
                                 sampling_ratio=1, aligned=True)
    return np.moveaxis(samples[0], 0, -1)


def build(seed: int = 0) -> Demo:
    rng = np.random.default_rng(seed)
    image = scene(rng)
    detections = decode_scene(rng)
    kept = detections[detections[:, 5] >= 0]
    if len(kept) == 0:
        raise RuntimeError("the demo decoded no detection above the threshold")
    pixels, offsets = [], []
    for _, x1, y1, x2, y2 in OBJECTS:
        pixel = (int((y1 + y2) / 2) - 3, int((x1 + x2) / 2) + 2)  # a pixel off the object's centre
        pixels.append(pixel)
        offsets.append(spreading_offsets(pixel, (x1, y1, x2, y2)))
    roi = kept[0, :4]
    return Demo(
        image, detections, pixels,
        deform_sampling_points(pixels, [np.zeros((KERNEL * KERNEL, 2), np.float32)] * len(pixels)),
        deform_sampling_points(pixels, offsets), roi, roi_align_samples(roi), snake(image),
    )


def _box(axes, box, colour, **style):
    """Draws box (x1, y1, x2, y2), in pixel-edge coordinates, over imshow's pixel-centre axes."""
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)
    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, **style))


def _regular_grid_zoom(axes, demo: Demo, reach: float = 2.0) -> None:
    """An enlarged view, under ``axes``, of the last (lowest) pixel's regular 3x3 grid: its
    points are one pixel apart, a few screen pixels in the whole image, too close to tell apart
    there."""
    (y, x), regular = demo.pixels[-1], demo.regular_points[-1]
    zoom = axes.inset_axes([0.32, -0.43, 0.36, 0.36])
    zoom.imshow(demo.image, interpolation="nearest")
    zoom.scatter(regular[:, 1], regular[:, 0], s=70, facecolors="none", edgecolors="black", linewidths=1.5)
    zoom.scatter([x], [y], marker="x", s=50, color="black")
    zoom.set_xlim(x - reach, x + reach)
    zoom.set_ylim(y + reach, y - reach)
    zoom.set_xticks([])
    zoom.set_yticks([])
    zoom.set_title(f"zoom: regular grid of output pixel ({y}, {x}) (x)", fontsize=9)
    axes.indicate_inset_zoom(zoom, edgecolor="black")


def figure(demo: Demo):
    """The demo's matplotlib figure: detections, deformable sampling points, RoI Align's grid,
    the snake."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right, snake_axes) = plt.subplots(1, 4, figsize=(20, 5.4))
    for axes in (left, middle, right, snake_axes):
        axes.imshow(demo.image, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])

    left.set_title("centernet_targets -> noisy heatmap -> centernet_decode")
    for x1, y1, x2, y2, score, label in demo.detections:
        if label < 0:
            continue
        _box(left, (x1, y1, x2, y2), "black", linewidth=2)
        left.text(x1 - 0.5, y1 - 2, f"{CLASS_NAMES[int(label)]} {score:.2f}", fontsize=9,
                  bbox=dict(facecolor="white", alpha=0.8, pad=1, edgecolor="none"))

    middle.set_title("deform_conv2d 3x3 sampling points\n(white: regular grid, zoomed below; yellow: with offsets)",
                     fontsize=11)
    for (y, x), regular, deformed in zip(demo.pixels, demo.regular_points, demo.deformed_points):
        for (ry, rx), (dy, dx) in zip(regular, deformed):
            middle.annotate("", (dx, dy), (rx, ry), arrowprops=dict(arrowstyle="->", color="black", lw=0.6))
        middle.scatter(deformed[:, 1], deformed[:, 0], s=30, color="yellow", edgecolors="black", linewidths=0.8)
        middle.scatter(regular[:, 1], regular[:, 0], s=5, color="white", edgecolors="black", linewidths=0.5,
                       zorder=3)
    _regular_grid_zoom(middle, demo)

    right.set_title(f"roi_align {ROI_BINS}x{ROI_BINS} bins, sampling_ratio=2, aligned\n(one detected box)")
    x1, y1, x2, y2 = (float(v) for v in demo.roi)
    _box(right, demo.roi, "black", linewidth=2)
    for i in range(1, ROI_BINS):  # inner bin edges, shifted like the box
        right.plot([x1 - 0.5 + i * (x2 - x1) / ROI_BINS] * 2, [y1 - 0.5, y2 - 0.5], "k--", lw=0.8)
        right.plot([x1 - 0.5, x2 - 0.5], [y1 - 0.5 + i * (y2 - y1) / ROI_BINS] * 2, "k--", lw=0.8)
    samples = demo.roi_samples.reshape(-1, 2)
    right.scatter(samples[:, 1], samples[:, 0], s=14, color="yellow", edgecolors="black", linewidths=0.6)
    margin = 6
    right.set_xlim(x1 - margin, x2 + margin)
    right.set_ylim(y2 + margin, y1 - margin)

    from matplotlib.lines import Line2D

    snake_axes.set_title(f"morphological_chan_vese (MorphACWE), {SNAKE_ITERATIONS} iterations\n"
                         "from a box, on the grey image")
    handles = []
    for colour, iteration in zip(("tab:cyan", "tab:orange", "tab:purple", "black"), SNAKE_DRAWN):
        snake_axes.contour(demo.snake[iteration], [0.5], colors=[colour], linewidths=1.5)
        handles.append(Line2D([], [], color=colour, label=f"iteration {iteration}"))
    snake_axes.legend(handles=handles, loc="center", fontsize=8, framealpha=0.8)

    figure.tight_layout()
    return figure


def render(demo: Demo, path) -> None:
    import matplotlib.pyplot as plt

    drawn = figure(demo)
    drawn.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(drawn)


def main(path, seed: int = 0) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("demo needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print("running the ops (the first run on a machine compiles their kernels, which takes a while; "
          "later runs load them from the disk cache)", file=sys.stderr, flush=True)
    demo = build(seed)
    for x1, y1, x2, y2, score, label in demo.detections:
        if label >= 0:
            print(f"{CLASS_NAMES[int(label)]:6s} score {score:.2f} box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f})")
    render(demo, path)
    print(f"wrote {path}")
    return 0
