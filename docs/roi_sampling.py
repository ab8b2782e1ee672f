"""Draw ``docs/roi_sampling.png``: where roi_pool, roi_align and deform_roi_pool read one roi.

Every position is computed here from the formulas of ``docs/roi.md``, in
feature-map coordinates where pixel (i, j) is centred on (x, y) = (j, i). Four panels, one roi,
a 3 x 3 output:

1. roi_pool: the box rounded half away from zero, its integer bins and the pixels each takes
   the max over;
2. roi_align, aligned, sampling_ratio 2: 2 x 2 bilinear samples per bin;
3. roi_align, aligned, adaptive sampling: ceil(bin size) samples per bin and axis;
4. deform_roi_pool, sampling_ratio 2: every bin moved by gamma * roi size * its offset.

Needs matplotlib (the ``docs`` extra: ``pip install ".[docs]"``). From the repository root:

    python docs/roi_sampling.py [output.png]     (default: docs/roi_sampling.png)
"""

import sys
from pathlib import Path

import numpy as np

MAP_HEIGHT, MAP_WIDTH = 9, 12  # feature map, pixels
SPATIAL_SCALE = 0.5
BOX = (3.0, 3.2, 20.4, 16.2)  # (x1, y1, x2, y2) in image coordinates
POOLED = 3  # output 3 x 3
GAMMA = 0.1
# deform_roi_pool's offset [2, PH, PW]: x (channel 0) and y (channel 1) of each bin, in units of
# gamma * roi size.
OFFSET = np.array([
    [[-1.0, 0.0, 1.0], [-1.5, 0.5, 1.5], [-1.0, 0.0, 1.0]],
    [[1.0, 1.5, 1.0], [0.0, -0.5, 0.0], [-1.0, -1.5, -1.0]],
])


def round_half_away(value):
    """Round half away from zero (CUDA's round), not NumPy's half-to-even."""
    return np.sign(value) * np.floor(np.abs(value) + 0.5)


def roi_pool_bins(box=BOX, spatial_scale=SPATIAL_SCALE, pooled=POOLED, size=(MAP_HEIGHT, MAP_WIDTH)):
    """roi_pool's bins: (rows, columns), each a list of ``pooled`` half-open pixel ranges
    [start, end), and the rounded box (xs, ys, xe, ye)."""
    xs, ys, xe, ye = round_half_away(np.multiply(box, spatial_scale)).astype(int)

    def axis(start, end, length):
        extent = max(end - start + 1, 1)
        return [(min(max(p * extent // pooled + start, 0), length),
                 min(max(-(-(p + 1) * extent // pooled) + start, 0), length)) for p in range(pooled)]

    return (axis(ys, ye, size[0]), axis(xs, xe, size[1])), (xs, ys, xe, ye)


def aligned_box(box=BOX, spatial_scale=SPATIAL_SCALE):
    """(x1, y1, width, height) of the roi on the feature map, half-pixel aligned."""
    x1, y1, x2, y2 = np.multiply(box, spatial_scale) - 0.5
    return x1, y1, x2 - x1, y2 - y1


def bin_samples(start, extent, pooled, sampling_ratio):
    """Sample positions along one axis, [pooled, g]: bin p starts at start + p * extent / pooled
    and holds g samples (sampling_ratio, or ceil(bin size) when <= 0) at its (i + 0.5) / g."""
    size = extent / pooled
    count = sampling_ratio if sampling_ratio > 0 else max(int(np.ceil(size)), 0)
    return start + np.arange(pooled)[:, None] * size + (np.arange(count) + 0.5) * size / count


def roi_align_samples(sampling_ratio, box=BOX, spatial_scale=SPATIAL_SCALE, pooled=POOLED):
    """roi_align's (aligned) sample rows y [PH, gh] and columns x [PW, gw]."""
    x1, y1, width, height = aligned_box(box, spatial_scale)
    return bin_samples(y1, height, pooled, sampling_ratio), bin_samples(x1, width, pooled, sampling_ratio)


def deform_roi_pool_samples(sampling_ratio, offset=OFFSET, gamma=GAMMA, box=BOX, spatial_scale=SPATIAL_SCALE,
                            pooled=POOLED):
    """deform_roi_pool's samples, y and x [PH, PW, gh, gw]: roi_align's grid (aligned, no minimum
    size) with bin (ph, pw) moved by gamma * roi size * offset[:, ph, pw]."""
    _, _, width, height = aligned_box(box, spatial_scale)
    y, x = roi_align_samples(sampling_ratio, box, spatial_scale, pooled)
    moved_y = y[:, None, :, None] + (gamma * height * offset[1])[:, :, None, None]
    moved_x = x[None, :, None, :] + (gamma * width * offset[0])[:, :, None, None]
    return np.broadcast_arrays(moved_y, moved_x)


def _map_axes(axes, title):
    """Pixel grid of the feature map: cell borders at half-integers, centres as dots."""
    for edge in np.arange(MAP_WIDTH + 1) - 0.5:
        axes.axvline(edge, color="0.85", lw=0.6, zorder=0)
    for edge in np.arange(MAP_HEIGHT + 1) - 0.5:
        axes.axhline(edge, color="0.85", lw=0.6, zorder=0)
    rows, columns = np.mgrid[:MAP_HEIGHT, :MAP_WIDTH]
    axes.plot(columns.ravel(), rows.ravel(), ".", color="0.7", ms=2, zorder=1)
    axes.set_xlim(-1.0, MAP_WIDTH)
    axes.set_ylim(MAP_HEIGHT, -1.0)  # rows grow downwards
    axes.set_aspect("equal")
    axes.set_xticks(range(0, MAP_WIDTH, 2))
    axes.set_yticks(range(0, MAP_HEIGHT, 2))
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=9)


def _rectangle(axes, x, y, width, height, **style):
    from matplotlib.patches import Rectangle

    axes.add_patch(Rectangle((x, y), width, height, **style))


def _box_outline(axes):
    x1, y1, x2, y2 = np.multiply(BOX, SPATIAL_SCALE)
    _rectangle(axes, x1, y1, x2 - x1, y2 - y1, fill=False, ec="k", ls="--", lw=1.0)


COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan"]


def _draw_roi_pool(axes):
    (rows, columns), (xs, ys, xe, ye) = roi_pool_bins()
    _map_axes(axes, "roi_pool: integer bins of the rounded box")
    _box_outline(axes)
    _rectangle(axes, xs - 0.5, ys - 0.5, xe - xs + 1, ye - ys + 1, fill=False, ec="k", lw=1.6)
    for ph, (h0, h1) in enumerate(rows):
        for pw, (w0, w1) in enumerate(columns):
            colour = COLOURS[ph * POOLED + pw]
            _rectangle(axes, w0 - 0.5, h0 - 0.5, w1 - w0, h1 - h0, fc=colour, alpha=0.18, ec=colour, lw=1.0)
            pixels_y, pixels_x = np.mgrid[h0:h1, w0:w1]
            # Bins may share a row or column; a small shift per bin keeps both markers visible.
            shift = 0.12 * (np.array([pw, ph]) - 1)
            axes.plot(pixels_x.ravel() + shift[0], pixels_y.ravel() + shift[1], "s", color=colour, ms=3)


def _aligned_bins(axes, y1, x1, height, width):
    for p in range(POOLED + 1):
        axes.plot([x1, x1 + width], [y1 + p * height / POOLED] * 2, color="k", lw=0.8)
        axes.plot([x1 + p * width / POOLED] * 2, [y1, y1 + height], color="k", lw=0.8)


def _draw_roi_align(axes, sampling_ratio, title):
    x1, y1, width, height = aligned_box()
    _map_axes(axes, title)
    _box_outline(axes)
    _aligned_bins(axes, y1, x1, height, width)
    y, x = roi_align_samples(sampling_ratio)
    for ph in range(POOLED):
        for pw in range(POOLED):
            sample_y, sample_x = np.meshgrid(y[ph], x[pw], indexing="ij")
            axes.plot(sample_x.ravel(), sample_y.ravel(), "o", color=COLOURS[ph * POOLED + pw], ms=3)


def _draw_deform_roi_pool(axes):
    x1, y1, width, height = aligned_box()
    _map_axes(axes, f"deform_roi_pool: bins moved by offsets (gamma {GAMMA})")
    _box_outline(axes)
    _aligned_bins(axes, y1, x1, height, width)
    bin_h, bin_w = height / POOLED, width / POOLED
    y, x = deform_roi_pool_samples(2)
    for ph in range(POOLED):
        for pw in range(POOLED):
            colour = COLOURS[ph * POOLED + pw]
            shift_x, shift_y = GAMMA * width * OFFSET[0, ph, pw], GAMMA * height * OFFSET[1, ph, pw]
            top, left = y1 + ph * bin_h + shift_y, x1 + pw * bin_w + shift_x
            _rectangle(axes, left, top, bin_w, bin_h, fc=colour, alpha=0.15, ec=colour, lw=1.0)
            centre_x, centre_y = x1 + (pw + 0.5) * bin_w, y1 + (ph + 0.5) * bin_h
            if shift_x or shift_y:
                axes.annotate("", (centre_x + shift_x, centre_y + shift_y), (centre_x, centre_y),
                              arrowprops=dict(arrowstyle="->", color=colour, lw=1.0))
            axes.plot(x[ph, pw].ravel(), y[ph, pw].ravel(), "o", color=colour, ms=3)


def draw(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(2, 2, figsize=(9.6, 7.6))
    _draw_roi_pool(panels[0, 0])
    _draw_roi_align(panels[0, 1], 2, "roi_align, aligned, sampling_ratio 2")
    adaptive = int(np.ceil(aligned_box()[3] / POOLED)), int(np.ceil(aligned_box()[2] / POOLED))
    _draw_roi_align(panels[1, 0], -1, f"roi_align, aligned, adaptive ({adaptive[0]} x {adaptive[1]} per bin)")
    _draw_deform_roi_pool(panels[1, 1])
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [
        Patch(fill=False, ec="k", ls="--", label="box * spatial_scale"),
        Patch(fill=False, ec="k", lw=1.6, label="rounded box (roi_pool)"),
        Line2D([], [], color="k", lw=0.8, label="bins of the aligned box (box * spatial_scale - 0.5)"),
        Line2D([], [], color="tab:blue", marker="o", ls="", ms=4,
               label="one colour per bin: its samples (dots) or pixels (squares)"),
    ]
    figure.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"One roi {BOX} (image coordinates), spatial_scale {SPATIAL_SCALE}, "
                    f"output {POOLED} x {POOLED}, on a {MAP_HEIGHT} x {MAP_WIDTH} feature map", fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("roi_sampling.png"))
