"""A Deformable U-Net and a plain U-Net of the same widths, trained on the CPU on a generated,
MRI-like segmentation set; prints the Dice and IoU of both on held-out images.

The Deformable U-Net (see docs/deform_unet.md) has encoder blocks that open with a modulated
deformable convolution (``pydeform.torch.ModulatedDeformConv2dPack``), learned-window max pooling for
down-sampling (``DeformPool2dPack``), transposed deformable convolutions for up-sampling
(``DeformConvTranspose2dPack``) and skip connections into plain decoder blocks. The plain U-Net
has the same layers with ``nn.Conv2d``, ``nn.MaxPool2d`` and ``nn.ConvTranspose2d``. Every
offset predictor starts at zero: the deformable layers start on the regular grid (the
modulated ones with masks of 0.5) and learn where to move.

The data (no download): each image is a body of textured tissue holding one or two *organs*
(filled ellipses, the foreground to segment) and one or two *cysts* (rings of the same
brightness, background), all bent by one smooth random displacement field (an elastic
deformation), then multiplied by a smooth random bias field (intensity inhomogeneity) and given
Rician noise (the magnitude of complex Gaussian noise, as in MRI). Everything is drawn from
seeded generators, so a run is repeatable.

From the repository root (needs PyTorch)::

    python docs/examples/deformable_unet.py                 # the run reported in docs/deform_unet.md
    python docs/examples/deformable_unet.py --epochs 2      # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from pydeform.torch import DeformConvTranspose2dPack, DeformPool2dPack, ModulatedDeformConv2dPack

# ----------------------------------------------------------------------------------------------
# The data


def _smooth_field(generator, count, channels, coarse, size, scale):
    """``[count, channels, size, size]``: Gaussian noise of standard deviation ``scale`` on a
    ``coarse`` x ``coarse`` grid, upsampled bicubically (a smooth random field)."""
    noise = torch.randn(count, channels, coarse, coarse, generator=generator) * scale
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)


def _ellipses(generator, count, grid_y, grid_x, centre_box, radii, rotate=True):
    """Signed, normalised distances ``r - 1`` (negative inside) of ``count`` random ellipses on
    the grid: ``[count, size, size]``."""
    cy, cx = ((torch.rand(2, count, 1, 1, generator=generator) * 2 - 1) * centre_box).unbind(0)
    ry, rx = (radii[0] + torch.rand(2, count, 1, 1, generator=generator) * (radii[1] - radii[0])).unbind(0)
    angle = torch.rand(count, 1, 1, generator=generator) * torch.pi if rotate else torch.zeros(count, 1, 1)
    dy, dx = grid_y - cy, grid_x - cx
    u = dy * torch.cos(angle) + dx * torch.sin(angle)
    v = -dy * torch.sin(angle) + dx * torch.cos(angle)
    return torch.sqrt((u / ry) ** 2 + (v / rx) ** 2) - 1


def make_dataset(count: int, size: int = 64, seed: int = 0):
    """``count`` images ``[count, 1, size, size]`` (float32, zero mean and unit variance each)
    and their masks (float32, 1 on the organs)."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    body = _ellipses(generator, count, grid_y, grid_x, 0.05, (0.8, 0.95)) < 0
    texture = _smooth_field(generator, count, 1, size // 4, size, 0.04)[:, 0]
    image = body * (0.35 + texture)
    organs = torch.zeros(count, size, size, dtype=torch.bool)
    cysts = torch.zeros(count, size, size, dtype=torch.bool)
    for shape in range(2):
        present = torch.rand(count, 1, 1, generator=generator) < (1.0 if shape == 0 else 0.6)
        organs |= present & (_ellipses(generator, count, grid_y, grid_x, 0.45, (0.14, 0.32)) < 0)
        ring = _ellipses(generator, count, grid_y, grid_x, 0.45, (0.14, 0.28))
        present = torch.rand(count, 1, 1, generator=generator) < (1.0 if shape == 0 else 0.5)
        cysts |= present & (ring.abs() < 0.22)
    brightness = 0.75 + 0.1 * torch.rand(count, 1, 1, generator=generator)
    image = torch.where(organs | cysts, brightness, image)
    # One elastic deformation bends image and labels alike.
    displacement = _smooth_field(generator, count, 2, 5, size, 0.07).permute(0, 2, 3, 1)
    sampling = torch.stack([grid_x, grid_y], dim=-1) + displacement
    image = F.grid_sample(image[:, None], sampling, mode="bilinear", padding_mode="zeros", align_corners=True)
    mask = F.grid_sample(organs[:, None].float(), sampling, mode="bilinear", padding_mode="zeros",
                         align_corners=True) > 0.5
    # Intensity inhomogeneity (a smooth multiplicative bias field), then Rician noise.
    image = image * torch.exp(_smooth_field(generator, count, 1, 3, size, 0.35))
    sigma = 0.06
    real = image + sigma * torch.randn(image.shape, generator=generator)
    imaginary = sigma * torch.randn(image.shape, generator=generator)
    image = torch.sqrt(real ** 2 + imaginary ** 2)
    image = (image - image.mean((2, 3), keepdim=True)) / image.std((2, 3), keepdim=True)
    return image.float(), mask.float()


# ----------------------------------------------------------------------------------------------
# The networks


def _norm_relu(channels):
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def conv_block(in_channels, out_channels, deformable):
    """Two 3x3 convolutions, each followed by batch normalisation and a ReLU; with
    ``deformable`` the first is a modulated deformable convolution (it sees the block's input
    and samples where its offsets say; the plain second one mixes what it found)."""
    first = (ModulatedDeformConv2dPack(in_channels, out_channels, 3, padding=1, bias=False) if deformable
             else nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
    return nn.Sequential(first, *_norm_relu(out_channels),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), *_norm_relu(out_channels))


class UNet(nn.Module):
    """A U-Net of ``depth`` down-sampling steps, ``width`` channels at full resolution (doubled
    at each step), one output logit per pixel. ``deformable``: the encoder blocks, the
    down-sampling and the up-sampling deformable; the decoder blocks are plain either way."""

    def __init__(self, deformable: bool, width: int = 8, depth: int = 3, in_channels: int = 1):
        super().__init__()
        widths = [width * 2 ** level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for level, channels in enumerate(widths):
            self.encoders.append(conv_block(previous, channels, deformable))
            if level < depth:
                self.downs.append(DeformPool2dPack(channels, 2, mode="max") if deformable else nn.MaxPool2d(2))
            previous = channels
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for channels in reversed(widths[:-1]):
            if deformable:
                self.ups.append(DeformConvTranspose2dPack(2 * channels, channels, 2, stride=2))
            else:
                self.ups.append(nn.ConvTranspose2d(2 * channels, channels, 2, stride=2))
            self.decoders.append(conv_block(2 * channels, channels, deformable=False))
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < len(self.downs):
                skips.append(x)
                x = self.downs[level](x)
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# Training and scoring


def segmentation_loss(logits, masks):
    """Binary cross-entropy plus the soft Dice loss of the batch."""
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities * masks).sum()
    dice = (2 * overlap + 1) / (probabilities.sum() + masks.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + (1 - dice)


def train(model, images, masks, *, epochs: int, batch_size: int = 16, lr: float = 1e-2, seed: int = 0,
          log=None) -> list:
    """Adam on shuffled batches (the order drawn from ``seed``), the offset predictors
    (``conv_offset``) at a tenth of the learning rate as in DCN; the loss of every step."""
    offsets = [p for name, p in model.named_parameters() if ".conv_offset." in name]
    others = [p for name, p in model.named_parameters() if ".conv_offset." not in name]
    optimizer = torch.optim.Adam([{"params": others}, {"params": offsets, "lr": lr / 10}], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * -(-len(images) // batch_size)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            loss = segmentation_loss(model(images[batch]), masks[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if log is not None:
            steps = -(-len(images) // batch_size)
            log(f"  epoch {epoch + 1}/{epochs}: mean loss {sum(losses[-steps:]) / steps:.4f}")
    return losses


@torch.no_grad()
def evaluate(model, images, masks, batch_size: int = 32):
    """Mean Dice and mean IoU over the images (the prediction: logit > 0)."""
    model.eval()
    dice, iou = [], []
    for start in range(0, len(images), batch_size):
        predicted = model(images[start:start + batch_size]) > 0
        truth = masks[start:start + batch_size] > 0.5
        overlap = (predicted & truth).sum((1, 2, 3)).double()
        total = predicted.sum((1, 2, 3)).double() + truth.sum((1, 2, 3)).double()
        dice.append(torch.where(total > 0, 2 * overlap / total, torch.ones_like(total)))
        union = total - overlap
        iou.append(torch.where(union > 0, overlap / union, torch.ones_like(union)))
    return torch.cat(dice).mean().item(), torch.cat(iou).mean().item()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=384, help="training images")
    parser.add_argument("--test", type=int, default=128, help="held-out images")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--width", type=int, default=8, help="channels at full resolution")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, masks = make_dataset(args.train, args.size, seed=args.seed)
    test_images, test_masks = make_dataset(args.test, args.size, seed=args.seed + 1)
    print(f"{args.train} training and {args.test} held-out {args.size}x{args.size} images, "
          f"foreground {masks.mean().item():.1%} of the pixels")
    results = {}
    for name, deformable in (("plain U-Net", False), ("Deformable U-Net", True)):
        torch.manual_seed(args.seed)
        model = UNet(deformable, width=args.width)
        print(f"{name}: {parameter_count(model)} parameters")
        start = time.perf_counter()
        train(model, images, masks, epochs=args.epochs, seed=args.seed, log=print)
        seconds = time.perf_counter() - start
        results[name] = evaluate(model, test_images, test_masks) + (seconds,)
    print("| network | held-out Dice | held-out IoU | training time |")
    print("|---|---|---|---|")
    for name, (dice, iou, seconds) in results.items():
        print(f"| {name} | {dice:.3f} | {iou:.3f} | {seconds:.0f} s |")
    return results


if __name__ == "__main__":
    main()
