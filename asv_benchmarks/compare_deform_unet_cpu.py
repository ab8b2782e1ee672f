"""CPU speed of the Deformable U-Net ops against the deform_conv2d calls doing the same work,
timed side by side in one process (median of repeated calls after two untimed ones).

- deform_conv_transpose2d forward + backward, N=2, C=64 -> 64, 32x32 -> 64x64, 3x3, stride 2,
  pad 1, output_padding 1, against deform_conv2d forward + backward on the matching shape
  (64x64 -> 32x32, the same offsets, mask and weight): target ratio >= 0.9;
- deform_pool2d forward (3x3, stride 2, pad 1, avg and max) on the 64x64 input, against
  deform_conv2d with the depthwise weight 1/9: target >= 5x.

Usage: ``python asv_benchmarks/compare_deform_unet_cpu.py [--size S] [--channels C] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pydeform


def median_seconds(function, repeats: int) -> float:
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(size: int = 32, channels: int = 64, repeats: int = 15) -> dict:
    """Median seconds of each call and the two ratios (peer time / op time)."""
    rng = np.random.default_rng(0)
    n, small, large = 2, size, 2 * size
    x = rng.standard_normal((n, channels, small, small)).astype(np.float32)
    image = rng.standard_normal((n, channels, large, large)).astype(np.float32)
    offset = rng.uniform(-2, 2, (n, 18, small, small)).astype(np.float32)
    mask = rng.uniform(0, 1, (n, 9, small, small)).astype(np.float32)
    weight = (0.05 * rng.standard_normal((channels, channels, 3, 3))).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    grad_large = rng.standard_normal((n, channels, large, large)).astype(np.float32)
    geometry = dict(stride=2, padding=1, mask=mask)

    def transpose():
        pydeform.deform_conv_transpose2d(x, offset, weight, bias, output_padding=1, **geometry)
        pydeform.deform_conv_transpose2d_backward(grad_large, x, offset, weight, bias, output_padding=1, **geometry)

    def convolution():
        pydeform.deform_conv2d(image, offset, weight, bias, **geometry)
        pydeform.deform_conv2d_backward(x, image, offset, weight, bias, **geometry)

    depthwise = np.full((channels, 1, 3, 3), 1 / 9, np.float32)
    times = {
        "deform_conv_transpose2d fwd+bwd": median_seconds(transpose, repeats),
        "deform_conv2d fwd+bwd": median_seconds(convolution, repeats),
        "deform_pool2d avg fwd": median_seconds(
            lambda: pydeform.deform_pool2d(image, offset, 3, mode="avg", **geometry), repeats),
        "deform_pool2d max fwd": median_seconds(
            lambda: pydeform.deform_pool2d(image, offset, 3, mode="max", **geometry), repeats),
        "depthwise deform_conv2d fwd": median_seconds(
            lambda: pydeform.deform_conv2d(image, offset, depthwise, **geometry), repeats),
    }
    peer = times["depthwise deform_conv2d fwd"]
    ratios = {
        "transpose vs deform_conv2d": times["deform_conv2d fwd+bwd"] / times["deform_conv_transpose2d fwd+bwd"],
        "pool avg vs depthwise deform_conv2d": peer / times["deform_pool2d avg fwd"],
        "pool max vs depthwise deform_conv2d": peer / times["deform_pool2d max fwd"],
    }
    return {"times": times, "ratios": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="the transposed op's input size (output: twice it)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    result = measure(args.size, args.channels, args.repeats)
    for name, seconds in result["times"].items():
        print(f"{name:35s} {seconds * 1e3:8.2f} ms")
    for name, ratio in result["ratios"].items():
        print(f"{name:35s} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
