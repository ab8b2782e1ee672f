"""Draw ``docs/deform_conv_sampling.png``: where a 3 x 3 deformable convolution reads its input.

Every position is computed here from the formula of ``docs/deform_conv.md``:
kernel point (i, j) of output pixel (y, x) reads the input at

    h = y*stride - padding + i*dilation + dy,   w = x*stride - padding + j*dilation + dx

with (dy, dx) the offset pair of channels 2*(i*3 + j) and 2*(i*3 + j) + 1 of ``offset``, by
bilinear interpolation of the four pixels around it. Three panels, one feature map, three output
pixels:

1. an ordinary convolution (zero offsets): the regular 3 x 3 grid;
2. deform_conv2d (DCNv1): offsets that scale the grid by 2, rotate it by 30 degrees, and move
   each point on its own;
3. DCNv2: the same positions, each sample also multiplied by its mask value (marker area).

Needs matplotlib (the ``docs`` extra: ``pip install ".[docs]"``). From the repository root:

    python docs/deform_conv_sampling.py [output.png]     (default: docs/deform_conv_sampling.png)
"""

import sys
from pathlib import Path

import numpy as np

MAP_SIZE = 14  # the feature map is MAP_SIZE x MAP_SIZE; stride 1 and padding 1 keep that size
KERNEL = 3
STRIDE, PADDING, DILATION = 1, 1, 1
POINTS = KERNEL * KERNEL
# The output pixels (y, x) whose samples are drawn, and what their offsets do.
PIXELS = ((4, 4), (4, 10), (10, 7))
SCALE = 2.0
ROTATION_DEGREES = 30.0


def regular_grid(y, x):
    """The ordinary convolution's read positions of output pixel (y, x): h, w, each [3, 3]."""
    i, j = np.mgrid[:KERNEL, :KERNEL]
    return y * STRIDE - PADDING + i * DILATION, x * STRIDE - PADDING + j * DILATION


def _make_offset_and_mask():
    """offset [2*9, H, W] (dy, dx per kernel point) and mask [9, H, W]: zero offsets and a unit
    mask except at PIXELS, as a trained DCNv2 layer could have them."""
    offset = np.zeros((2 * POINTS, MAP_SIZE, MAP_SIZE))
    mask = np.ones((POINTS, MAP_SIZE, MAP_SIZE))
    rng = np.random.default_rng(3)
    (y0, x0), (y1, x1), (y2, x2) = PIXELS
    # Scaling: each point moves away from the centre by (SCALE - 1) times its distance.
    h, w = regular_grid(y0, x0)
    moves = [(SCALE - 1) * (h - y0), (SCALE - 1) * (w - x0)]
    # Rotation about the centre pixel.
    h, w = regular_grid(y1, x1)
    angle = np.radians(ROTATION_DEGREES)
    rotated_h = y1 + np.cos(angle) * (h - y1) + np.sin(angle) * (w - x1)
    rotated_w = x1 - np.sin(angle) * (h - y1) + np.cos(angle) * (w - x1)
    moves += [rotated_h - h, rotated_w - w]
    # Free: every point moved on its own.
    moves += list(rng.uniform(-1.4, 1.4, (2, KERNEL, KERNEL)))
    for n, (y, x) in enumerate(PIXELS):
        offset[0::2, y, x] = moves[2 * n].ravel()
        offset[1::2, y, x] = moves[2 * n + 1].ravel()
        mask[:, y, x] = rng.uniform(0.15, 1.0, POINTS)
    return offset, mask


OFFSET, MASK = _make_offset_and_mask()


def sampling_positions(y, x, offset=OFFSET):
    """deform_conv2d's read positions of output pixel (y, x): h, w, each [3, 3]."""
    h, w = regular_grid(y, x)
    return h + offset[0::2, y, x].reshape(KERNEL, KERNEL), w + offset[1::2, y, x].reshape(KERNEL, KERNEL)


def scene():
    """A background image for the map: a tilted elliptic blob, standing for an object."""
    rows, columns = np.mgrid[:MAP_SIZE, :MAP_SIZE].astype(float)
    u, v = (columns - 7.5) * 0.8 + (rows - 6.5) * 0.6, -(columns - 7.5) * 0.6 + (rows - 6.5) * 0.8
    return np.exp(-((u / 5.5) ** 2 + (v / 3.2) ** 2))


COLOURS = ("tab:blue", "tab:orange", "tab:green")


def _map_axes(axes, title):
    axes.imshow(scene(), cmap="Greys", vmin=0, vmax=2.5, extent=(-0.5, MAP_SIZE - 0.5, MAP_SIZE - 0.5, -0.5))
    for edge in np.arange(MAP_SIZE + 1) - 0.5:
        axes.axvline(edge, color="0.85", lw=0.5, zorder=1)
        axes.axhline(edge, color="0.85", lw=0.5, zorder=1)
    axes.set_xlim(-0.5, MAP_SIZE - 0.5)
    axes.set_ylim(MAP_SIZE - 0.5, -0.5)  # rows grow downwards
    axes.set_xticks(range(0, MAP_SIZE, 2))
    axes.set_yticks(range(0, MAP_SIZE, 2))
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=9)


def _output_pixel(axes, y, x, colour):
    from matplotlib.patches import Rectangle

    axes.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec=colour, lw=2.0, zorder=3))


def _draw_regular(axes):
    _map_axes(axes, "ordinary 3x3 convolution (zero offsets)")
    for (y, x), colour in zip(PIXELS, COLOURS):
        h, w = regular_grid(y, x)
        _output_pixel(axes, y, x, colour)
        axes.plot(w.ravel(), h.ravel(), "o", color=colour, ms=5, zorder=4)


def _draw_deformed(axes):
    _map_axes(axes, f"deform_conv2d: scaled x{SCALE:g}, rotated {ROTATION_DEGREES:g} deg, free")
    for (y, x), colour in zip(PIXELS, COLOURS):
        regular_h, regular_w = regular_grid(y, x)
        h, w = sampling_positions(y, x)
        _output_pixel(axes, y, x, colour)
        axes.plot(regular_w.ravel(), regular_h.ravel(), "o", mfc="none", mec=colour, ms=5, zorder=4)
        for start_h, start_w, end_h, end_w in zip(regular_h.ravel(), regular_w.ravel(), h.ravel(), w.ravel()):
            axes.annotate("", (end_w, end_h), (start_w, start_h),
                          arrowprops=dict(arrowstyle="->", color=colour, lw=0.8), zorder=4)
        axes.plot(w.ravel(), h.ravel(), "o", color=colour, ms=5, zorder=5)


def _draw_modulated(axes):
    _map_axes(axes, "DCNv2: each sample times its mask (marker area)")
    for (y, x), colour in zip(PIXELS, COLOURS):
        h, w = sampling_positions(y, x)
        _output_pixel(axes, y, x, colour)
        axes.scatter(w.ravel(), h.ravel(), s=90 * MASK[:, y, x], color=colour, zorder=5)


def draw(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure, panels = plt.subplots(1, 3, figsize=(12.0, 4.6))
    _draw_regular(panels[0])
    _draw_deformed(panels[1])
    _draw_modulated(panels[2])
    legend = [
        Patch(fill=False, ec="k", lw=2.0, label="output pixel (y, x)"),
        Line2D([], [], color="k", marker="o", ls="", mfc="none", ms=5, label="regular position"),
        Line2D([], [], color="k", marker="o", ls="", ms=5,
               label="sampling position = regular + (dy, dx), read bilinearly"),
    ]
    figure.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"Where a 3x3 deformable convolution (stride {STRIDE}, padding {PADDING}, dilation "
                    f"{DILATION}) reads a {MAP_SIZE} x {MAP_SIZE} feature map, at three output pixels",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 0.96))
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("deform_conv_sampling.png"))
