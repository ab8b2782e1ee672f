"""CenterNet problems (decode, targets, focal loss), hypothesis strategies for them, and how a
backend's result is judged against the float64 reference; shared by the tests of every backend
(Numba CPU, the Numba CUDA simulator, the GPU).

Heat values are drawn from a few levels so that plateaus, equal scores across classes and
neighbourhood ties are common, and sometimes NaN. The reference always runs on the case's own
(already rounded) values, so scores and classes must agree exactly and boxes to the dtype's
tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from hypothesis import strategies as st

import reference
from pydeform.centernet import CenterNetDecodeParams, CenterNetTargets, CenterNetTargetsParams, FocalLossParams
from tests.strategies import assert_close, to_numpy

HEAT_LEVELS = (0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class DecodeCase:
    heat: np.ndarray
    wh: np.ndarray
    reg: Optional[np.ndarray]
    K: int
    kernel: int = 3
    cat_spec_wh: bool = False
    down_ratio: float = 1.0
    threshold: Optional[float] = None

    def options(self) -> dict:
        return dict(K=self.K, kernel=self.kernel, cat_spec_wh=self.cat_spec_wh, down_ratio=self.down_ratio,
                    threshold=self.threshold)

    def map_arrays(self, convert: Callable) -> "DecodeCase":
        return dataclasses.replace(self, heat=convert(self.heat), wh=convert(self.wh),
                                   reg=None if self.reg is None else convert(self.reg))

    def run(self, module, **extra):
        """``module.centernet_decode`` (pydeform or reference) on this case."""
        return module.centernet_decode(self.heat, self.wh, self.reg, **self.options(), **extra)

    def reference(self) -> np.ndarray:
        return self.map_arrays(to_numpy).run(reference)

    def params(self) -> CenterNetDecodeParams:
        batch, classes, height, width = self.heat.shape
        return CenterNetDecodeParams(batch, classes, height, width, self.K, self.kernel, self.cat_spec_wh,
                                     self.reg is not None, float(self.down_ratio), self.threshold is not None,
                                     0.0 if self.threshold is None else float(self.threshold))


def build_decode_case(rng, dtype, batch=2, classes=3, size=(5, 6), K=10, *, with_reg=True, nan_fraction=0.0,
                      heat_offset=0.0, **options) -> DecodeCase:
    """A decode problem with heat values from :data:`HEAT_LEVELS` plus ``heat_offset`` (-1.5:
    all negative, like logits, whose peaks rank below the zeros of non-peaks), NaN with
    ``nan_fraction``."""
    height, width = size
    heat = rng.choice(HEAT_LEVELS, size=(batch, classes, height, width)) + heat_offset
    heat[rng.random(heat.shape) < nan_fraction] = np.nan
    wh_channels = 2 * classes if options.get("cat_spec_wh") else 2
    wh = rng.uniform(0.5, 8.0, (batch, wh_channels, height, width))
    reg = rng.uniform(0.0, 1.0, (batch, 2, height, width)) if with_reg else None

    def cast(a):
        return None if a is None else a.astype(dtype)

    return DecodeCase(cast(heat), cast(wh), cast(reg), K, **options)


@st.composite
def decode_cases(draw, dtype=np.float64) -> DecodeCase:
    batch = draw(st.integers(0, 2))
    classes = draw(st.integers(1, 3))
    size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    per_image = classes * size[0] * size[1]
    K = draw(st.one_of(st.integers(0, min(per_image, 12)), st.integers(per_image, per_image + 4)))
    options = dict(
        kernel=draw(st.sampled_from([1, 3, 5])),
        cat_spec_wh=draw(st.booleans()),
        down_ratio=draw(st.sampled_from([1.0, 4.0, 2.5])),
        threshold=draw(st.sampled_from([None, 0.3, 0.75])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return build_decode_case(rng, dtype, batch, classes, size, K, with_reg=draw(st.booleans()),
                             nan_fraction=draw(st.sampled_from([0.0, 0.1])),
                             heat_offset=draw(st.sampled_from([0.0, 0.0, -1.5])), **options)


def assert_detections_match(got, expected: np.ndarray, dtype) -> None:
    """Detections of a backend against the reference's: the accumulation dtype, scores and
    classes exactly, boxes to the dtype's tolerance and, without reg, box centres exactly at the
    reference's pixel (x + 0.5, y + 0.5)."""
    acc = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    assert got.dtype == np.dtype(acc), f"detections: dtype {got.dtype}, expected {np.dtype(acc).name}"
    got = to_numpy(got).astype(np.float64)
    assert got.shape == expected.shape, f"detections: shape {got.shape}, expected {expected.shape}"
    np.testing.assert_array_equal(got[..., 5], expected[..., 5], err_msg="classes differ")
    np.testing.assert_array_equal(got[..., 4], expected[..., 4], err_msg="scores differ")
    assert_close("boxes", got[..., :4], expected[..., :4], dtype)


def assert_centres_match(got, expected: np.ndarray, down_ratio: float, reg=None) -> None:
    """The detections sit at the reference's pixels. A box centre is (x + 0.5, y + 0.5) *
    down_ratio without ``reg``; with it, (x + reg[b, 0, y, x], y + reg[b, 1, y, x]) * down_ratio,
    whose pixel is the one with the nearest such centre (random offsets keep them apart)."""
    got = to_numpy(got).astype(np.float64)

    def centres(d):
        return (d[..., 0:2] + d[..., 2:4]) / 2 / down_ratio  # [B, K, 2] (x, y)

    if reg is None:
        np.testing.assert_array_equal(np.floor(centres(got)), np.floor(centres(expected)), err_msg="positions differ")
        return
    reg = to_numpy(reg).astype(np.float64)
    height, width = reg.shape[2:]
    ys, xs = np.mgrid[0:height, 0:width]
    for b in range(reg.shape[0]):
        pixel_centres = np.stack([xs + reg[b, 0], ys + reg[b, 1]], axis=-1).reshape(-1, 2)  # [H*W, 2]

        def pixels(d):
            return np.abs(centres(d)[b][:, None, :] - pixel_centres[None]).max(axis=-1).argmin(axis=-1)

        np.testing.assert_array_equal(pixels(got), pixels(expected), err_msg=f"positions differ in image {b}")


@dataclass(frozen=True)
class TargetsCase:
    boxes: np.ndarray
    labels: np.ndarray
    num_classes: int
    output_size: tuple
    down_ratio: float = 4.0
    min_overlap: float = 0.7
    max_objects: int = 128

    def options(self) -> dict:
        return dict(down_ratio=self.down_ratio, min_overlap=self.min_overlap, max_objects=self.max_objects)

    def run(self, module, **extra):
        return module.centernet_targets(self.boxes, self.labels, self.num_classes, self.output_size,
                                        **self.options(), **extra)

    def reference(self):
        return reference.centernet_targets(to_numpy(self.boxes), to_numpy(self.labels), self.num_classes,
                                           self.output_size, **self.options())

    def params(self) -> CenterNetTargetsParams:
        batch, max_boxes = self.labels.shape
        return CenterNetTargetsParams(batch, max_boxes, self.num_classes, *self.output_size, float(self.down_ratio),
                                      float(self.min_overlap), self.max_objects)


def build_targets_case(rng, dtype, batch=2, objects=5, num_classes=3, output_size=(8, 10), *, padding=0.3,
                       **options) -> TargetsCase:
    """Boxes in input pixels (down_ratio times the output grid, some reaching outside it) on a
    quarter-pixel grid, labels with a ``padding`` fraction of -1."""
    down_ratio = options.get("down_ratio", 4.0)
    out_h, out_w = output_size
    corner = rng.uniform(-0.2, 1.0, (batch, objects, 2)) * (out_w, out_h) * down_ratio
    size = rng.uniform(0.0, 0.8, (batch, objects, 2)) * (out_w, out_h) * down_ratio
    boxes = np.round(np.concatenate([corner, corner + size], axis=2) * 4) / 4
    labels = rng.integers(0, num_classes, (batch, objects))
    labels[rng.random(labels.shape) < padding] = -1
    return TargetsCase(boxes.astype(dtype), labels, num_classes, tuple(output_size), **options)


def overlapping_targets_case(dtype) -> TargetsCase:
    """Three boxes of one class whose Gaussians (radius 2) overlap, a fourth of another class,
    and padding, on a 16 x 16 grid."""
    boxes = np.array([[[0, 0, 14, 14], [2, 1, 14, 13], [1, 3, 13, 15], [4, 4, 12, 9], [0, 0, 0, 0]]], dtype=dtype)
    return TargetsCase(boxes, np.array([[0, 0, 0, 1, -1]]), 2, (16, 16), down_ratio=1.0)


@st.composite
def targets_cases(draw, dtype=np.float64) -> TargetsCase:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    objects = draw(st.integers(0, 6))
    return build_targets_case(
        rng, dtype, batch=draw(st.integers(0, 2)), objects=objects, num_classes=draw(st.integers(1, 3)),
        output_size=(draw(st.integers(1, 12)), draw(st.integers(1, 12))),
        down_ratio=draw(st.sampled_from([1.0, 4.0, 2.5])), min_overlap=draw(st.sampled_from([0.7, 0.3, 0.95])),
        max_objects=draw(st.integers(1, objects + 2)),
    )


def assert_targets_match(got, expected, dtype) -> None:
    for name in ("heatmap", "wh", "reg"):
        value = getattr(got, name)
        assert value.dtype == np.dtype(dtype), f"{name}: dtype {value.dtype}, expected {np.dtype(dtype).name}"
        assert_close(name, value, getattr(expected, name), dtype)
    for name, kind in (("ind", np.int64), ("reg_mask", np.uint8)):
        value = getattr(got, name)
        assert value.dtype == np.dtype(kind), f"{name}: dtype {value.dtype}"
        np.testing.assert_array_equal(to_numpy(value), getattr(expected, name), err_msg=f"{name} differs")


@dataclass(frozen=True)
class FocalCase:
    pred: np.ndarray
    target: np.ndarray
    grad_output: np.ndarray
    alpha: float = 2.0
    beta: float = 4.0

    def loss(self, module, **extra):
        return module.centernet_focal_loss(self.pred, self.target, alpha=self.alpha, beta=self.beta, **extra)

    def grad(self, module, **extra):
        return module.centernet_focal_loss_backward(self.grad_output, self.pred, self.target, alpha=self.alpha,
                                                    beta=self.beta, **extra)

    def map_arrays(self, convert: Callable) -> "FocalCase":
        return dataclasses.replace(self, pred=convert(self.pred), target=convert(self.target),
                                   grad_output=convert(self.grad_output))

    def params(self) -> FocalLossParams:
        return FocalLossParams(float(self.alpha), float(self.beta))


def build_focal_case(rng, dtype, shape=(2, 3, 4, 5), *, positives=3, alpha=2.0, beta=4.0) -> FocalCase:
    """Predictions in (0, 1) with some beyond the clamp bounds, a target heatmap with
    ``positives`` exact 1s and values in [0, 1) elsewhere."""
    pred = rng.uniform(0.02, 0.98, shape)
    flat = pred.reshape(-1)
    if flat.size >= 4:
        flat[:2] = (1e-6, 1 - 1e-6)  # clamped: no gradient
    target = rng.uniform(0.0, 0.99, shape)
    target.reshape(-1)[rng.permutation(target.size)[:positives]] = 1.0
    return FocalCase(pred.astype(dtype), target.astype(dtype), np.array(rng.uniform(0.5, 2.0), dtype=dtype), alpha,
                     beta)


def assert_focal_matches(loss, grad, case: FocalCase, dtype) -> None:
    case = case.map_arrays(to_numpy)
    expected_loss = reference.centernet_focal_loss(case.pred, case.target, case.alpha, case.beta)
    assert not np.isscalar(loss), f"loss: expected a 0-d array, got {type(loss).__name__}"
    assert loss.shape == () and loss.dtype == np.dtype(dtype), (loss.shape, loss.dtype)
    assert_close("loss", loss, np.asarray(expected_loss), dtype)
    expected_grad = reference.centernet_focal_loss_backward(case.grad_output, case.pred, case.target, case.alpha,
                                                           case.beta)
    assert grad.dtype == np.dtype(dtype)
    assert_close("grad_pred", grad, expected_grad, dtype)


# Kernel sets called directly, with NaN-poisoned outputs (every element must be written).

def check_decode_kernel(kernels, case: DecodeCase) -> None:
    xp = kernels.xp
    dtype = case.heat.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    device = case.map_arrays(xp.asarray)
    detections = xp.full((case.heat.shape[0], case.K, 6), np.nan, dtype=acc)
    kernels.decode(device.heat, device.wh, device.reg, detections, case.params())
    expected = case.reference()
    assert_detections_match(detections, expected, dtype)
    assert_centres_match(detections, expected, case.down_ratio, case.reg)


def check_targets_kernel(kernels, case: TargetsCase) -> None:
    """``targets`` on zero-filled outputs (the contract), against the reference."""
    xp = kernels.xp
    batch = case.labels.shape[0]
    dtype = case.boxes.dtype
    outputs = (xp.zeros((batch, case.num_classes, *case.output_size), dtype), xp.zeros((batch, case.max_objects, 2),
               dtype), xp.zeros((batch, case.max_objects, 2), dtype), xp.zeros((batch, case.max_objects), np.int64),
               xp.zeros((batch, case.max_objects), np.uint8))
    kernels.targets(xp.asarray(case.boxes), xp.asarray(case.labels.astype(np.int64)), *outputs, case.params())
    assert_targets_match(CenterNetTargets(*outputs), case.reference(), dtype)


def check_focal_kernels(kernels, case: FocalCase) -> None:
    """``focal_loss_sums`` and ``focal_loss_grad`` with NaN-poisoned sums and gradient."""
    xp = kernels.xp
    dtype = case.pred.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    device = case.map_arrays(xp.asarray)
    sums = xp.full(3, np.nan, dtype=acc)
    kernels.focal_loss_sums(device.pred, device.target, sums, case.params())
    positives = float((case.target.astype(np.float64) == 1).sum())
    assert float(to_numpy(sums)[2]) == positives
    loss = to_numpy((sums[0] + sums[1]) / max(positives, 1.0)).astype(dtype)
    grad = xp.full(case.pred.shape, np.nan, dtype=dtype)
    kernels.focal_loss_grad(device.grad_output, device.pred, device.target, sums, grad, case.params())
    assert_focal_matches(np.asarray(loss), to_numpy(grad), case, dtype)
