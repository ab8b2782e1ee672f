"""Draw ``docs/semiconv_embedding.png``: semi-convolutional embeddings as arrows to their
instance points, and the instances the voting ops recover from them.

A synthetic image of three identical squares on a plain background. The ideal displacement
field phi (what a network trained with ``instance_mean_loss`` on ``semiconv_embed(phi)``
aims at) points every pixel at its instance's centre, so psi = phi + coordinates is constant
per instance; a purely convolutional embedding cannot tell the copies apart (equal pixels
give equal phi), the coordinates can. Left: phi as arrows from each pixel. Middle:
``hough_votes`` of psi. Right: ``hough_peaks`` + ``assign_to_centers`` labels. All computed by
pydeform.

Needs matplotlib (the ``docs`` extra). From the repository root:

    python docs/semiconv_embedding.py [output.png]     (default: docs/semiconv_embedding.png)
"""

import sys
from pathlib import Path

import numpy as np

import pydeform

HEIGHT, WIDTH = 24, 32
SQUARES = ((3, 4), (12, 14), (4, 22))  # top-left corners of the identical 7x7 squares
SIDE = 7


def scene():
    """(truth labels int32 [1, H, W], ideal phi float32 [1, 2, H, W])."""
    truth = np.zeros((1, HEIGHT, WIDTH), np.int32)
    for k, (y, x) in enumerate(SQUARES, start=1):
        truth[0, y:y + SIDE, x:x + SIDE] = k
    ys, xs = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    phi = np.zeros((1, 2, HEIGHT, WIDTH), np.float32)
    for k, (y, x) in enumerate(SQUARES, start=1):
        inside = truth[0] == k
        phi[0, 0][inside] = y + (SIDE - 1) / 2 - ys[inside]
        phi[0, 1][inside] = x + (SIDE - 1) / 2 - xs[inside]
    return truth, phi


def recover(phi, truth):
    """(votes [1, H, W], peaks, labels [1, H, W]) of pydeform's voting ops."""
    foreground = truth > 0
    votes = pydeform.hough_votes(phi, foreground, coordinates=True)
    peaks = pydeform.hough_peaks(votes, len(SQUARES), min_votes=2)
    labels = pydeform.assign_to_centers(phi, foreground, peaks.centers, 1.5, coordinates=True)
    return votes, peaks, labels


def main(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, phi = scene()
    votes, peaks, labels = recover(phi, truth)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ys, xs = np.nonzero(truth[0])
    axes[0].imshow(truth[0] > 0, cmap="Greys", alpha=0.3)
    axes[0].quiver(xs, ys, phi[0, 1, ys, xs], phi[0, 0, ys, xs], angles="xy", scale_units="xy", scale=1,
                   width=0.003, color="tab:blue")
    axes[0].set_title("phi: displacement to the instance point")
    axes[1].imshow(votes[0], cmap="magma")
    axes[1].set_title("hough_votes(phi, coordinates=True)")
    axes[2].imshow(labels[0], cmap="tab10", vmin=0, vmax=9)
    axes[2].plot(peaks.centers[0, :, 1], peaks.centers[0, :, 0], "w+", markersize=10)
    axes[2].set_title("hough_peaks + assign_to_centers")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_suffix(".png"))
