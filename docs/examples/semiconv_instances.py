"""Identical copies of one shape: a plain convolutional embedding against a semi-convolutional one.

Images of three identical squares on a plain background (generated, seeded). A small fully
convolutional network is trained with the instance mean loss twice: once on its plain output
phi, once on ``semiconv_embed(phi)`` (phi plus the pixel coordinates). Instances of held-out
images are then recovered by voting (``hough_votes`` + ``hough_peaks`` + ``assign_to_centers``)
and scored by the adjusted Rand index over the foreground pixels (1 = every square found, 0 =
chance). The squares keep away from the image border by more than the network's receptive
field, so the network sees the copies identically: a plain embedding gives all of them the same
values, which the loss cannot tell from success; the coordinates make each copy's embedding
point at its own place (the semi-convolutional paper, Novotny et al., ECCV 2018).

Run: ``python docs/examples/semiconv_instances.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import pydeform.torch as pt

SIZE, SIDE, COPIES, MARGIN = 40, 5, 3, 8  # image side, square side, squares per image, border gap


def make_images(rng, count):
    """``count`` images [count, 1, SIZE, SIZE] (squares 1, background 0) and their int64 labels
    (0 background, 1..COPIES the squares), squares at least 2 pixels apart."""
    images = np.zeros((count, 1, SIZE, SIZE), np.float32)
    labels = np.zeros((count, SIZE, SIZE), np.int64)
    for i in range(count):
        placed = []
        while len(placed) < COPIES:
            y, x = rng.integers(MARGIN, SIZE - MARGIN - SIDE + 1, size=2)
            if all(abs(y - py) >= SIDE + 2 or abs(x - px) >= SIDE + 2 for py, px in placed):
                placed.append((y, x))
        for k, (y, x) in enumerate(placed, start=1):
            images[i, 0, y:y + SIDE, x:x + SIDE] = 1.0
            labels[i, y:y + SIDE, x:x + SIDE] = k
    return torch.from_numpy(images), torch.from_numpy(labels)


def network():
    """Dilated 3x3 convolutions (receptive field 15 pixels, less than the border gap) to a
    2-channel embedding phi."""
    layers, channels = [], 1
    for dilation in (1, 2, 4):
        layers += [nn.Conv2d(channels, 32, 3, padding=dilation, dilation=dilation), nn.ReLU()]
        channels = 32
    return nn.Sequential(*layers, nn.Conv2d(channels, 2, 1))


def embedding(model, images, semiconvolutional):
    phi = model(images)
    return pt.semiconv_embed(phi) if semiconvolutional else phi


def train(semiconvolutional, steps, seed=0, batch=8):
    """The network trained with the instance mean loss; returns (model, losses per step)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        images, labels = make_images(rng, batch)
        loss = pt.instance_mean_loss(embedding(model, images, semiconvolutional), labels, COPIES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


def recover(psi, foreground):
    """Instance labels by voting: each foreground pixel votes at its rounded embedding, the
    COPIES strongest vote peaks are the instances, each pixel joins the nearest peak."""
    votes = pt.hough_votes(psi, foreground)
    peaks = pt.hough_peaks(votes, COPIES, min_votes=3)
    return pt.assign_to_centers(psi, foreground, peaks.centers.to(psi.dtype))


def adjusted_rand_index(truth, predicted):
    """The adjusted Rand index of two labellings of the same pixels (Hubert and Arabie)."""
    _, truth = np.unique(truth, return_inverse=True)
    _, predicted = np.unique(predicted, return_inverse=True)
    table = np.zeros((truth.max() + 1, predicted.max() + 1))
    np.add.at(table, (truth, predicted), 1)

    def pairs(counts):
        return (counts * (counts - 1) / 2).sum()

    index, rows, columns = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * columns / pairs(np.array([truth.size]))
    maximum = (rows + columns) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def evaluate(model, semiconvolutional, count=50, seed=1234):
    """Mean adjusted Rand index over the foreground of ``count`` held-out images."""
    images, labels = make_images(np.random.default_rng(seed), count)
    with torch.no_grad():
        psi = embedding(model, images, semiconvolutional)
    foreground = labels > 0
    predicted = recover(psi, foreground)
    return float(np.mean([adjusted_rand_index(labels[i][foreground[i]].numpy(), predicted[i][foreground[i]].numpy())
                          for i in range(count)]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for semiconvolutional, name in ((False, "plain phi"), (True, "semiconv_embed(phi)")):
        model, losses = train(semiconvolutional, args.steps)
        print(f"{name}: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}, "
              f"held-out adjusted Rand index {evaluate(model, semiconvolutional):.3f}")


if __name__ == "__main__":
    main()
