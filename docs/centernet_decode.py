"""Draw ``docs/centernet_decode.png``: how CenterNet's decode turns heatmaps into boxes.

Every step is computed here from the rules of ``docs/centernet.md``, with NumPy
alone, on a synthetic two-class scene of one image:

1. the class heatmaps (already through a sigmoid): a Gaussian bump per object plus low noise;
2. the peak test: a pixel is kept iff it equals the maximum of its 3 x 3 window (outside the map
   counts as -inf); the K best kept scores over both classes, ties to the lowest flat index
   c*H*W + y*W + x;
3. the boxes: centre (x + reg_x, y + reg_y), size (w, h) read at the peak; detections scoring
   below the threshold are kept in place with score 0 and class -1.

Needs matplotlib (the ``docs`` extra: ``pip install ".[docs]"``). From the repository root:

    python docs/centernet_decode.py [output.png]     (default: docs/centernet_decode.png)
"""

import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

HEIGHT, WIDTH = 24, 32  # the output grid (feature-map units)
CLASSES = 2
K = 8
WINDOW = 3
THRESHOLD = 0.3
# Objects: (class, centre x, centre y, width, height, peak score), in feature-map units; centres
# are fractional, as real object centres are.
OBJECTS = (
    (0, 6.3, 6.6, 8.0, 9.0, 0.95),
    (0, 22.7, 16.4, 11.0, 8.0, 0.85),
    (0, 9.5, 18.2, 6.0, 5.0, 0.6),
    (1, 14.4, 7.8, 7.0, 6.0, 0.9),
    (1, 27.6, 5.3, 5.0, 7.0, 0.5),
)


def scene(seed=0):
    """heat [1, C, H, W], wh [1, 2, H, W] and reg [1, 2, H, W] as a trained network would give
    them: at each object's centre pixel, its size and the fractional part of its centre."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:HEIGHT, :WIDTH].astype(np.float64)
    heat = rng.uniform(0.0, 0.2, (CLASSES, HEIGHT, WIDTH))
    wh = rng.uniform(1.0, 3.0, (2, HEIGHT, WIDTH))
    reg = rng.uniform(0.0, 1.0, (2, HEIGHT, WIDTH))
    for cls, x, y, w, h, score in OBJECTS:
        centre_x, centre_y = int(x), int(y)
        sigma = (min(w, h) * 2 + 1) / 6 * 1.5
        bump = score * np.exp(-((columns - centre_x) ** 2 + (rows - centre_y) ** 2) / (2 * sigma**2))
        heat[cls] = np.maximum(heat[cls], bump)
        wh[:, centre_y, centre_x] = w, h
        reg[:, centre_y, centre_x] = x - centre_x, y - centre_y
    return heat[None], wh[None], reg[None]


def peaks(heat, window=WINDOW):
    """heat [B, C, H, W] with every pixel that is not the maximum of its window set to 0."""
    pad = window // 2
    padded = np.pad(heat, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    window_max = sliding_window_view(padded, (window, window), axis=(2, 3)).max(axis=(-2, -1))
    return np.where(heat == window_max, heat, 0.0)


def decode(heat, wh, reg, k=K, threshold=THRESHOLD):
    """Detections [B, K, 6]: (x1, y1, x2, y2, score, class) of the K best peaks of each image."""
    batch, classes, height, width = heat.shape
    kept = peaks(heat).reshape(batch, -1)
    # A stable sort of the negated scores: equal scores keep their flat-index order.
    order = np.argsort(-kept, axis=1, kind="stable")[:, :k]
    detections = np.zeros((batch, k, 6))
    for b in range(batch):
        cls, pixel = np.divmod(order[b], height * width)
        y, x = np.divmod(pixel, width)
        centre_x, centre_y = x + reg[b, 0, y, x], y + reg[b, 1, y, x]
        w, h = wh[b, 0, y, x], wh[b, 1, y, x]
        score = kept[b, order[b]]
        valid = score >= threshold
        detections[b] = np.stack([centre_x - w / 2, centre_y - h / 2, centre_x + w / 2, centre_y + h / 2,
                                  np.where(valid, score, 0.0), np.where(valid, cls, -1)], axis=1)
    return detections


COLOURS = ("tab:orange", "tab:cyan")


def _map_axes(axes, image, title):
    axes.imshow(image, cmap="magma", vmin=0, vmax=1, extent=(-0.5, WIDTH - 0.5, HEIGHT - 0.5, -0.5))
    axes.set_xticks(range(0, WIDTH, 4))
    axes.set_yticks(range(0, HEIGHT, 4))
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=9)


def draw(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    heat, wh, reg = scene()
    kept = peaks(heat)[0]
    detections = decode(heat, wh, reg)[0]
    order = np.argsort(-kept.reshape(-1), kind="stable")[:K]
    figure, panels = plt.subplots(1, 3, figsize=(13.5, 3.9))

    _map_axes(panels[0], heat[0].max(axis=0), "heat (max over the 2 classes)")
    for cls, x, y, w, h, _ in OBJECTS:
        panels[0].add_patch(Rectangle((x - w / 2, y - h / 2), w, h, fill=False, ec=COLOURS[cls], ls="--", lw=1.0))

    _map_axes(panels[1], heat[0].max(axis=0), f"kept peaks ({WINDOW}x{WINDOW} maxima) and the top {K}")
    for cls in range(CLASSES):
        y, x = np.nonzero(kept[cls])
        panels[1].plot(x, y, ".", color=COLOURS[cls], ms=3)
    for rank, flat in enumerate(order):
        cls, pixel = divmod(int(flat), HEIGHT * WIDTH)
        y, x = divmod(pixel, WIDTH)
        panels[1].plot(x, y, "o", mfc="none", mec=COLOURS[cls], ms=9, mew=1.5)
        panels[1].annotate(str(rank + 1), (x, y), (x + 0.7, y - 0.7), color="w", fontsize=8)

    _map_axes(panels[2], heat[0].max(axis=0), f"detections (threshold {THRESHOLD}: below it class -1)")
    for x1, y1, x2, y2, score, cls in detections:
        style = dict(ec=COLOURS[int(cls)], lw=1.5) if cls >= 0 else dict(ec="0.6", lw=1.0, ls=":")
        panels[2].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **style))
        if cls >= 0:
            panels[2].annotate(f"{score:.2f}", (x1, y1), (x1 + 0.2, y1 - 0.4), color="w", fontsize=7)

    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color=COLOURS[c], lw=1.5, label=f"class {c}") for c in range(CLASSES)]
    legend += [Line2D([], [], color="k", ls="--", lw=1.0, label="object box"),
               Line2D([], [], color="0.6", ls=":", lw=1.0, label="detection below the threshold")]
    figure.legend(handles=legend, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"CenterNet decode of one {CLASSES}-class {HEIGHT} x {WIDTH} output, K = {K}", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("centernet_decode.png"))
