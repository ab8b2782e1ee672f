"""Draw ``docs/levelset_snakes.png``: morphological snakes converging, in 2-D on scikit-image's
``camera`` and ``coins`` and in 3-D on a volume of two blobs.

Top left: MorphACWE (``morphological_chan_vese``) on ``camera`` from a checkerboard, 35
iterations, smoothing 3, the contour at a few iterations (scikit-image's gallery example). Top
right: MorphGAC (``morphological_geodesic_active_contour``) on the inverse Gaussian gradient of
``coins``, shrinking (balloon -1) from a box 10 pixels inside the border, 230 iterations. Bottom:
MorphACWE on a noisy 48^3 volume holding two balls, from the default ball in the middle: the
slice through both balls with the contour at a few iterations, and the projection of the final
level set along z beside the balls' outlines. The contours are the level sets pydeform's
``iter_callback`` hands over.

Needs matplotlib and scikit-image (for its sample images). From the repository root:

    python docs/levelset_snakes.py [output.png]     (default: docs/levelset_snakes.png)
"""

import sys
from pathlib import Path

import numpy as np

import pydeform

ACWE_ITERATIONS, ACWE_DRAWN = 35, (0, 2, 7, 35)
GAC_ITERATIONS, GAC_DRAWN = 230, (0, 100, 230)
VOLUME_SIDE = 48
BALLS = (((24, 16, 15), 8.0), ((24, 31, 34), 6.0))  # (z, y, x) centres and radii
VOLUME_ITERATIONS, VOLUME_DRAWN = 30, (0, 10, 20, 30)


def evolution(run, drawn):
    """(final level set, {iteration: level set} for the iterations in ``drawn``) of ``run(callback)``."""
    snapshots, seen = {}, [0]

    def callback(level_set):
        if seen[0] in drawn:
            snapshots[seen[0]] = level_set
        seen[0] += 1

    return run(callback), snapshots


def camera_acwe():
    """(image, final level set, snapshots) of MorphACWE on ``camera``."""
    from skimage import data

    image = data.camera()
    start = pydeform.checkerboard_level_set(image.shape, 6)
    final, snapshots = evolution(lambda callback: pydeform.morphological_chan_vese(
        image, ACWE_ITERATIONS, start, smoothing=3, iter_callback=callback), ACWE_DRAWN)
    return image, final, snapshots


def coins_gac():
    """(image, final level set, snapshots) of MorphGAC on the inverse Gaussian gradient of ``coins``."""
    from skimage import data

    image = data.coins()
    gimage = pydeform.inverse_gaussian_gradient(image / 255.0)
    start = np.zeros(image.shape, np.int8)
    start[10:-10, 10:-10] = 1
    final, snapshots = evolution(lambda callback: pydeform.morphological_geodesic_active_contour(
        gimage, GAC_ITERATIONS, start, smoothing=1, balloon=-1, threshold=0.69, iter_callback=callback), GAC_DRAWN)
    return image, final, snapshots


def two_balls():
    """(volume, truth): integer grey values, bright balls (200) on a dark background (50) with
    noise of standard deviation 30; truth is 1 inside the balls (int8)."""
    grid = np.indices((VOLUME_SIDE,) * 3)
    truth = np.zeros((VOLUME_SIDE,) * 3, np.int8)
    for centre, radius in BALLS:
        truth |= (sum((axis - c) ** 2 for axis, c in zip(grid, centre)) < radius**2).astype(np.int8)
    noise = np.random.default_rng(0).normal(0.0, 30.0, truth.shape)
    volume = np.clip(np.round(50.0 + 150.0 * truth + noise), 0, 255).astype(np.uint8)
    return volume, truth


def volume_acwe(volume):
    """(final level set, snapshots) of MorphACWE on ``volume`` from the default ball."""
    return evolution(lambda callback: pydeform.morphological_chan_vese(
        volume, VOLUME_ITERATIONS, "disk", smoothing=1, iter_callback=callback), VOLUME_DRAWN)


def _contours(axes, snapshots, colours):
    from matplotlib.lines import Line2D

    handles = []
    for (iteration, level_set), colour in zip(sorted(snapshots.items()), colours):
        axes.contour(level_set, [0.5], colors=[colour], linewidths=1.3)
        handles.append(Line2D([], [], color=colour, label=f"iteration {iteration}"))
    axes.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)


def main(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("tab:blue", "tab:orange", "tab:green", "red")
    figure, axes = plt.subplots(2, 2, figsize=(10, 9.2))
    (camera_axes, coins_axes), (slice_axes, projection_axes) = axes

    image, _, snapshots = camera_acwe()
    camera_axes.imshow(image, cmap="gray")
    _contours(camera_axes, {k: v for k, v in snapshots.items() if k}, colours[1:])
    camera_axes.set_title(f"morphological_chan_vese on camera\n{ACWE_ITERATIONS} iterations, smoothing 3, "
                          "checkerboard start", fontsize=10)

    image, _, snapshots = coins_gac()
    coins_axes.imshow(image, cmap="gray")
    _contours(coins_axes, snapshots, colours[:1] + colours[2:])
    coins_axes.set_title(f"morphological_geodesic_active_contour on coins\n{GAC_ITERATIONS} iterations, "
                         "balloon -1, threshold 0.69", fontsize=10)

    volume, truth = two_balls()
    final, snapshots = volume_acwe(volume)
    z = BALLS[0][0][0]
    slice_axes.imshow(volume[z], cmap="gray")
    _contours(slice_axes, {k: v[z] for k, v in snapshots.items()}, colours)
    slice_axes.set_title(f"3-D: morphological_chan_vese on a {VOLUME_SIDE}^3 volume\nslice z = {z} "
                         "through both balls", fontsize=10)

    projection_axes.imshow(final.max(axis=0), cmap="Greys", vmin=0, vmax=1.6)
    projection_axes.contour(truth.max(axis=0), [0.5], colors=["red"], linewidths=1.3, linestyles="dashed")
    projection_axes.set_title(f"3-D: the final level set (iteration {VOLUME_ITERATIONS}) projected along z\n"
                              "(red dashed: the balls' outlines)", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=60)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_suffix(".png"))
