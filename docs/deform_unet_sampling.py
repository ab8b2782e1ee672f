"""Draw ``docs/deform_unet_sampling.png``: where deform_pool2d reads and where
deform_conv_transpose2d writes.

The positions are computed by the ops themselves, on images whose value at each pixel is its own
row or column (bilinear sampling and splatting are exact on affine images, away from the
border), with the offsets set by hand at three pixels of each panel:

1. deform_pool2d, 3 x 3 window, stride 2, padding 1, max mode, on a feature map holding a
   tilted blob: kernel point k of output pixel (y, x) reads
   ``(2*y - 1 + i + dy_k, 2*x - 1 + j + dx_k)``. With a mask that keeps point k only, avg
   pooling of the row image gives that row divided by 9. The arg-max point of each window
   (``return_indices=True`` on the blob) is ringed.
2. deform_conv_transpose2d, 3 x 3, stride 2, padding 1 (up-sampling 8 x 8 to 16 x 16): input pixel
   (y, x) splats kernel point k onto the four output pixels around
   ``(2*y - 1 + i + dy_k, 2*x - 1 + j + dx_k)``. A weight that sends point k to output channel k
   splats a one-pixel input there, and the centroid of the splat is the point.

Needs matplotlib (the ``docs`` extra: ``pip install ".[docs]"``). From the repository root:

    python docs/deform_unet_sampling.py [output.png]     (default: docs/deform_unet_sampling.png)
"""

import sys
from pathlib import Path

import numpy as np

import pydeform

MAP_SIZE = 16  # the pooled map and the up-sampled output are MAP_SIZE x MAP_SIZE
COARSE_SIZE = 8  # the pooling output and the transposed convolution's input
KERNEL, STRIDE, PADDING = 3, 2, 1
POINTS = KERNEL * KERNEL
# Pixels of the coarse grid whose windows (pooling) or splats (transposed convolution) are drawn.
PIXELS = ((2, 2), (2, 5), (5, 4))
COLOURS = ("tab:blue", "tab:orange", "tab:green")


def regular_grid(y, x):
    """The plain op's positions for coarse pixel (y, x): h, w, each [3, 3] (the pooling window
    it reads, or the output points the transposed convolution writes)."""
    i, j = np.mgrid[:KERNEL, :KERNEL]
    return y * STRIDE - PADDING + i, x * STRIDE - PADDING + j


def _make_offset():
    """offset [2*9, 8, 8]: zero except at PIXELS, where the grid is stretched along the blob,
    rotated, and moved point by point, as trained layers could have it."""
    offset = np.zeros((2 * POINTS, COARSE_SIZE, COARSE_SIZE))
    rng = np.random.default_rng(7)
    i, j = np.mgrid[:KERNEL, :KERNEL] - 1.0
    stretch = (0.6 * i + 1.1 * j, 0.8 * j - 0.2 * i)  # along the blob's long axis
    angle = np.radians(35.0)
    rotate = (np.cos(angle) * i + np.sin(angle) * j - i, -np.sin(angle) * i + np.cos(angle) * j - j)
    free = tuple(rng.uniform(-0.9, 0.9, (2, KERNEL, KERNEL)))
    for (y, x), (dy, dx) in zip(PIXELS, (stretch, rotate, free)):
        offset[0::2, y, x] = dy.ravel()
        offset[1::2, y, x] = dx.ravel()
    return offset


OFFSET = _make_offset()


def scene():
    """The feature map that is pooled: a tilted elliptic blob."""
    rows, columns = np.mgrid[:MAP_SIZE, :MAP_SIZE].astype(float)
    u, v = (columns - 8.0) * 0.8 + (rows - 6.5) * 0.6, -(columns - 8.0) * 0.6 + (rows - 6.5) * 0.8
    return np.exp(-((u / 6.0) ** 2 + (v / 3.0) ** 2))


def _coordinates():
    """[1, 2, 16, 16]: each pixel's row and column."""
    rows, columns = np.mgrid[:MAP_SIZE, :MAP_SIZE].astype(np.float64)
    return np.stack([rows, columns])[None]


def pool_positions():
    """Where deform_pool2d reads, by deform_pool2d: h, w, each [9, 8, 8]."""
    positions = np.empty((2, POINTS, COARSE_SIZE, COARSE_SIZE))
    for k in range(POINTS):
        mask = np.zeros((1, POINTS, COARSE_SIZE, COARSE_SIZE))
        mask[0, k] = 1.0
        pooled = pydeform.deform_pool2d(_coordinates(), OFFSET[None], KERNEL, STRIDE, PADDING, mode="avg", mask=mask)
        positions[:, k] = POINTS * pooled[0]
    return positions[0], positions[1]


def pool_argmax():
    """deform_pool2d's arg-max kernel point of each window on the blob: [8, 8]."""
    _, indices = pydeform.deform_pool2d(scene()[None, None], OFFSET[None], KERNEL, STRIDE, PADDING, mode="max",
                                        return_indices=True)
    return indices[0, 0]


def splat_positions(y, x):
    """Where deform_conv_transpose2d writes input pixel (y, x)'s kernel points, by
    deform_conv_transpose2d: the centroids h, w (each [9]) of the splats of a one-pixel input
    through a weight that sends point k to output channel k."""
    impulse = np.zeros((1, 1, COARSE_SIZE, COARSE_SIZE))
    impulse[0, 0, y, x] = 1.0
    weight = np.eye(POINTS).reshape(1, POINTS, KERNEL, KERNEL)
    splats = pydeform.deform_conv_transpose2d(impulse, OFFSET[None], weight, stride=STRIDE, padding=PADDING,
                                              output_padding=1)[0]
    rows, columns = _coordinates()[0]
    total = splats.sum((1, 2))
    return (splats * rows).sum((1, 2)) / total, (splats * columns).sum((1, 2)) / total


def _map_axes(axes, title, image=None):
    if image is not None:
        axes.imshow(image, cmap="Greys", vmin=0, vmax=2.5, extent=(-0.5, MAP_SIZE - 0.5, MAP_SIZE - 0.5, -0.5))
    for edge in np.arange(MAP_SIZE + 1) - 0.5:
        axes.axvline(edge, color="0.85", lw=0.5, zorder=1)
        axes.axhline(edge, color="0.85", lw=0.5, zorder=1)
    axes.set_xlim(-0.5, MAP_SIZE - 0.5)
    axes.set_ylim(MAP_SIZE - 0.5, -0.5)  # rows grow downwards
    axes.set_xticks(range(0, MAP_SIZE, 2))
    axes.set_yticks(range(0, MAP_SIZE, 2))
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=9)


def _moves(axes, regular, moved, colour):
    """Open circles at the regular positions, arrows to the filled moved ones."""
    (regular_h, regular_w), (h, w) = regular, moved
    axes.plot(regular_w.ravel(), regular_h.ravel(), "o", mfc="none", mec=colour, ms=5, zorder=4)
    for start_h, start_w, end_h, end_w in zip(regular_h.ravel(), regular_w.ravel(), h.ravel(), w.ravel()):
        axes.annotate("", (end_w, end_h), (start_w, start_h),
                      arrowprops=dict(arrowstyle="->", color=colour, lw=0.8), zorder=4)
    axes.plot(w.ravel(), h.ravel(), "o", color=colour, ms=5, zorder=5)


def _draw_pool(axes):
    from matplotlib.patches import Rectangle

    _map_axes(axes, "deform_pool2d (3x3 window, stride 2, max): where output pixels read", scene())
    h, w = pool_positions()
    argmax = pool_argmax()
    for (y, x), colour in zip(PIXELS, COLOURS):
        # The output pixel's footprint on the input: the stride x stride cell it stands for.
        axes.add_patch(Rectangle((x * STRIDE - 0.5, y * STRIDE - 0.5), STRIDE, STRIDE, fill=False, ec=colour,
                                 lw=2.0, zorder=3))
        _moves(axes, regular_grid(y, x), (h[:, y, x], w[:, y, x]), colour)
        k = argmax[y, x]
        axes.plot(w[k, y, x], h[k, y, x], "o", mfc="none", mec="k", ms=11, mew=1.5, zorder=6)


def _draw_transpose(axes):
    from matplotlib.patches import Rectangle

    _map_axes(axes, "deform_conv_transpose2d (3x3, stride 2): where input pixels write")
    for (y, x), colour in zip(PIXELS, COLOURS):
        axes.add_patch(Rectangle((x * STRIDE - 0.5, y * STRIDE - 0.5), STRIDE, STRIDE, fill=False, ec=colour,
                                 lw=2.0, zorder=3))
        _moves(axes, regular_grid(y, x), splat_positions(y, x), colour)


def draw(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure, panels = plt.subplots(1, 2, figsize=(10.0, 5.2))
    _draw_pool(panels[0])
    _draw_transpose(panels[1])
    legend = [
        Patch(fill=False, ec="k", lw=2.0, label="coarse pixel (y, x), drawn on the fine grid"),
        Line2D([], [], color="k", marker="o", ls="", mfc="none", ms=5, label="regular position"),
        Line2D([], [], color="k", marker="o", ls="", ms=5, label="regular + (dy, dx), read / written bilinearly"),
        Line2D([], [], color="k", marker="o", ls="", mfc="none", ms=11, mew=1.5, label="max-pool arg-max"),
    ]
    figure.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"Learned offsets in a Deformable U-Net: pooling {MAP_SIZE}x{MAP_SIZE} -> "
                    f"{COARSE_SIZE}x{COARSE_SIZE}, up-sampling {COARSE_SIZE}x{COARSE_SIZE} -> {MAP_SIZE}x{MAP_SIZE}",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.09, 1, 0.96))
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("deform_unet_sampling.png"))
