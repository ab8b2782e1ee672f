"""Cross-check of the reference roi_align and roi_pool with ONNX Runtime's CPU ``RoiAlign``
(opset 16) and ``MaxRoiPool``, implementations nobody here wrote.

Where ORT agrees with the definitions of docs/roi.md (asserted to rounding below):
- RoiAlign mode="avg", both coordinate transformations (half_pixel = aligned,
  output_half_pixel = not aligned with the 1x1 floor), adaptive (sampling_ratio 0) and fixed
  sampling, spatial_scale, rule B's border (samples exactly on y = -1, y = H, x = -1, x = W read
  the clamped pixel), zero-size rois and rois negative on both axes (0).
- MaxRoiPool: round half away from zero, the ``+ 1`` roi size, bins clipped to the image, empty
  bins 0 - exactly pydeform's roi_pool (no rounding difference was found, also at x * scale = +-2.5).

Where ORT differs from docs/roi.md (onnxruntime 1.23; each asserted by a targeted test):
1. RoiAlign mode="max" does not take the max of the interpolated samples. It takes, over every
   sample of the bin and over each sample's 4 corners, the max of ``corner weight * pixel``
   (ORT's log warns that max mode is wrong for sampling ratios other than 1; it differs for 1 as
   well). A sample between pixels counts as its largest weighted corner, and a sample on a pixel
   centre as max(pixel, 0), its zero-weight corners contributing 0. So it equals pydeform's max only
   where every sample sits on a pixel centre and those pixels are >= 0.
2. RoiAlign half_pixel with adaptive sampling raises (SafeInt "Integer overflow") for a roi whose
   ceil(bin size) is negative on one axis and positive on the other (gh * gw < 0); pydeform draws no
   samples there and gives 0.
3. Not a semantic difference: ``spatial_scale`` is a float32 attribute, so ORT applies the
   float32 rounding of a float64 scale; these tests give the reference that rounded scale.
ORT runs MaxRoiPool in float32 only; RoiAlign also in float64.
"""

from dataclasses import dataclass

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from pydeform._onnx_models import max_roi_pool_session, roi_align_session
from reference import roi_align, roi_pool
from reference.bilinear import border_clamped_corners


@dataclass(frozen=True)
class Geometry:
    """A feature map of height x width, its output size and RoiAlign options."""

    height: int
    width: int
    output_size: object
    spatial_scale: float
    sampling_ratio: int = 0
    aligned: bool = False

    @property
    def scale(self):
        """spatial_scale as ORT's float32 attribute holds it."""
        return float(np.float32(self.spatial_scale))

    def align_options(self, mode="avg"):
        return {"output_size": self.output_size, "spatial_scale": self.scale,
                "sampling_ratio": self.sampling_ratio, "aligned": self.aligned, "mode": mode}

    def session(self, mode, dtype):
        return roi_align_session(self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.aligned, mode, dtype)


ALIGN_GEOMETRIES = [
    Geometry(7, 9, (2, 3), 1.0),
    Geometry(7, 9, (2, 3), 1.0, aligned=True),
    Geometry(10, 8, 3, 0.5, sampling_ratio=2),
    Geometry(10, 8, 3, 0.5, sampling_ratio=2, aligned=True),
    Geometry(5, 12, (4, 1), 0.25, aligned=True),
    Geometry(12, 11, (3, 5), 0.7, sampling_ratio=3),
    Geometry(1, 6, (1, 2), 2.0, sampling_ratio=1, aligned=True),
    Geometry(16, 16, 7, 0.0625),
]

# float32 compares float32-rounded arguments with their exact float64 result.
TOLERANCES = {np.float32: 1e-5, np.float64: 1e-12}


def agreeing_rois(rng, geometry, count=6, batch=2):
    """Image-coordinate rois [count + 2, 5] for the geometry's map: inside, partly and wholly
    outside, up to 1.5 times the map (many adaptive samples), one of size 0 and one negative on
    both axes; none negative on one axis only (ORT fails on those, difference 2)."""
    extent = np.array([geometry.width, geometry.height]) / geometry.scale
    corners = rng.uniform(-0.3, 1.1, (count, 2)) * extent
    ends = corners + rng.uniform(0, 1.5, (count, 2)) * extent
    boxes = np.concatenate([np.column_stack([corners, ends]),
                            [np.r_[corners[0], corners[0]], np.r_[ends[1], corners[1]]]])
    return np.column_stack([rng.integers(0, batch, len(boxes)), boxes])


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    # Relative to the output's scale: outputs near 0 come from cancelling sums.
    tolerance = TOLERANCES[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tolerance,
                               atol=tolerance * max(np.abs(expected).max(), 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("index", range(len(ALIGN_GEOMETRIES)))
def test_roi_align_avg_matches_onnxruntime(index, dtype):
    geometry = ALIGN_GEOMETRIES[index]
    rng = np.random.default_rng(index)
    image = rng.standard_normal((2, 3, geometry.height, geometry.width)).astype(dtype)
    boxes = agreeing_rois(rng, geometry).astype(dtype)
    actual = geometry.session("avg", dtype)(image, boxes)
    assert_close(actual, roi_align(image, boxes, **geometry.align_options()), dtype)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_border_samples_match_onnxruntime(aligned):
    """One sample per roi, exactly on the border of rule B's square [-1, H] x [-1, W] and just
    outside it, on a 3 x 4 map."""
    points = np.array([(-1, 2), (3, 2), (1, -1), (1, 4), (-1, -1), (3, 4), (-1.01, 2), (1, 4.01)])
    # A 1x1 roi samples its centre (aligned, a 1x1 roi starting half a pixel later does).
    starts = points[:, ::-1] - 0.5 + (0.5 if aligned else 0.0)
    boxes = np.column_stack([np.zeros(len(points)), starts, starts + 1])
    image = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    geometry = Geometry(3, 4, 1, 1.0, sampling_ratio=1, aligned=aligned)
    actual = geometry.session("avg", np.float64)(image, boxes)
    expected = roi_align(image, boxes, **geometry.align_options())
    np.testing.assert_array_equal(actual, expected)
    assert np.all(expected[:6] != 0) and not expected[6:].any()


def pixel_centre_rois(rng, geometry, count=6, batch=2):
    """Rois (at spatial_scale 1) whose samples all lie on pixel centres: the first sample half a
    sample step from x1', which is a half-integer (an integer box when aligned, a half-integer
    box otherwise), and an odd whole number of pixels per sample step; some reach outside."""
    pooled = np.array(np.broadcast_to(geometry.output_size, 2)[::-1])     # (PW, PH)
    if geometry.sampling_ratio:
        samples_per_axis = geometry.sampling_ratio * pooled
        sizes = samples_per_axis * (2 * rng.integers(0, 2, (count, 1)) + 1)
    else:   # adaptive: ceil(roi size / bins) samples one pixel apart
        sizes = pooled * rng.integers(1, 4, (count, 1))
    starts = (rng.integers(-3, [geometry.width, geometry.height], (count, 2))
              + (0.0 if geometry.aligned else 0.5))
    return np.column_stack([rng.integers(0, batch, count), starts, starts + sizes])


@pytest.mark.parametrize("geometry", [
    Geometry(7, 9, (2, 3), 1.0, sampling_ratio=2),
    Geometry(7, 9, (2, 3), 1.0, sampling_ratio=2, aligned=True),
    Geometry(8, 6, 3, 1.0),
    Geometry(8, 6, 3, 1.0, aligned=True),
])
def test_roi_align_max_matches_onnxruntime_on_pixel_centres_of_a_positive_map(geometry):
    rng = np.random.default_rng(1)
    image = rng.uniform(0.5, 2.0, (2, 3, geometry.height, geometry.width))
    boxes = pixel_centre_rois(rng, geometry)
    actual = geometry.session("max", np.float64)(image, boxes)
    np.testing.assert_array_equal(actual, roi_align(image, boxes, **geometry.align_options("max")))


def weighted_corner_max(image, boxes, geometry):
    """ORT's max mode (difference 1): per bin, the max over samples and corners of
    corner weight * pixel. image [N, C, H, W], boxes [K, 5] -> [K, C, PH, PW]."""
    pooled_h, pooled_w = np.broadcast_to(geometry.output_size, 2)
    half = 0.5 if geometry.aligned else 0.0
    output = []
    for box in boxes:
        x1, y1, x2, y2 = box[1:] * geometry.scale - half
        roi_w, roi_h = x2 - x1, y2 - y1
        if not geometry.aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        grid_h = geometry.sampling_ratio or int(np.ceil(roi_h / pooled_h))
        grid_w = geometry.sampling_ratio or int(np.ceil(roi_w / pooled_w))
        if grid_h <= 0 or grid_w <= 0:      # no samples: 0, as in pydeform
            output.append(np.zeros((image.shape[1], pooled_h, pooled_w)))
            continue
        # Sample positions [PH, gh, 1, 1] and [1, 1, PW, gw].
        y = y1 + (np.arange(pooled_h)[:, None] + (np.arange(grid_h) + 0.5) / grid_h) * roi_h / pooled_h
        x = x1 + (np.arange(pooled_w)[:, None] + (np.arange(grid_w) + 0.5) / grid_w) * roi_w / pooled_w
        y, x = np.broadcast_arrays(y[:, :, None, None], x[None, None])
        corners = border_clamped_corners(y, x, geometry.height, geometry.width)
        pixels = image[int(box[0])][:, corners.rows, corners.cols]        # [C, 4, PH, gh, PW, gw]
        output.append(np.max(corners.weights * pixels, axis=(1, 3, 5)))
    return np.array(output)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5])
def test_onnxruntime_max_mode_is_the_max_of_weighted_corners(index):
    """Difference 1 on the agreement geometries: ORT follows weighted_corner_max to rounding and
    is far from pydeform's max of the interpolated samples."""
    geometry = ALIGN_GEOMETRIES[index]
    rng = np.random.default_rng(index)
    image = rng.standard_normal((2, 3, geometry.height, geometry.width))
    boxes = agreeing_rois(rng, geometry)
    actual = geometry.session("max", np.float64)(image, boxes)
    np.testing.assert_allclose(actual, weighted_corner_max(image, boxes, geometry),
                               rtol=1e-12, atol=1e-12)
    assert np.abs(actual - roi_align(image, boxes, **geometry.align_options("max"))).max() > 0.1


def test_onnxruntime_max_mode_hand_computed():
    # One sample at x = 0.5 between pixels 2 and 4: pydeform interpolates 3, ORT takes 0.5 * 4.
    geometry = Geometry(1, 2, 1, 1.0, sampling_ratio=1)
    image, box = np.array([[[[2.0, 4.0]]]]), np.array([[0, 0, 0, 1, 1]])
    assert roi_align(image, box, **geometry.align_options("max"))[0, 0, 0, 0] == 3.0
    assert geometry.session("max", np.float64)(image, box)[0, 0, 0, 0] == 2.0
    # Samples on the centres of negative pixels: pydeform's max is the pixel, ORT's is 0.
    geometry = Geometry(1, 3, (1, 3), 1.0, sampling_ratio=1, aligned=True)
    image, box = np.array([[[[-1.0, -2.0, -3.0]]]]), np.array([[0, 0, 0, 3, 1]])
    np.testing.assert_array_equal(roi_align(image, box, **geometry.align_options("max")),
                                  [[[[-1, -2, -3]]]])
    np.testing.assert_array_equal(geometry.session("max", np.float64)(image, box), 0.0)


def test_onnxruntime_fails_on_a_roi_negative_on_one_axis():
    """Difference 2: half_pixel, adaptive; x2 - x1 = -3 and y2 - y1 = 3 give gh * gw = -9."""
    geometry = Geometry(6, 6, 1, 1.0, aligned=True)
    image = np.ones((1, 1, 6, 6))
    one_axis, both_axes = np.array([[0, 5, 1, 2, 4]]), np.array([[0, 5, 4, 2, 1]])
    assert not roi_align(image, one_axis, **geometry.align_options()).any()
    with pytest.raises(Fail, match="Integer overflow"):
        geometry.session("avg", np.float64)(image, one_axis)
    # Negative on both axes, gh * gw = 9 > 0 but no sample is drawn: ORT gives 0 as well.
    assert not geometry.session("avg", np.float64)(image, both_axes).any()


# --- MaxRoiPool --------------------------------------------------------------------------------

POOL_GEOMETRIES = [
    Geometry(7, 9, (2, 3), 1.0),
    Geometry(10, 8, 3, 0.5),
    Geometry(5, 12, (4, 1), 0.25),
    Geometry(12, 11, (3, 5), 0.3),
    Geometry(1, 6, (1, 2), 2.0),
    Geometry(16, 16, 7, 0.0625),
]


@pytest.mark.parametrize("index", range(len(POOL_GEOMETRIES)))
def test_roi_pool_matches_onnxruntime(index):
    geometry = POOL_GEOMETRIES[index]
    rng = np.random.default_rng(index)
    image = rng.standard_normal((2, 3, geometry.height, geometry.width)).astype(np.float32)
    boxes = agreeing_rois(rng, geometry, count=8)
    # Half-integer boxes too: at dyadic scales their rounding meets exact halves.
    boxes[::2, 1:] = np.round(2 * boxes[::2, 1:]) / 2
    boxes = boxes.astype(np.float32)
    actual = max_roi_pool_session(geometry.output_size, geometry.spatial_scale)(image, boxes)
    expected = roi_pool(image, boxes, geometry.output_size, geometry.scale)
    assert actual.dtype == np.float32 and (expected == 0).any()
    np.testing.assert_array_equal(actual, expected)


def test_onnxruntime_max_roi_pool_rounds_half_away_from_zero():
    # The hand-computed cases of test_reference_roi: 2.5 -> 3, 1.5 -> 2; -2.5 -> -3.
    image = (1 + 10 * np.arange(4.0)[:, None] + np.arange(6.0))[None, None].astype(np.float32)
    boxes = np.array([[0, 5, 3, 5, 3]], np.float32)
    assert max_roi_pool_session(1, 0.5)(image, boxes)[0, 0, 0, 0] == 24
    boxes = np.array([[0, -2.5, 0, 0.4, 0]], np.float32)
    np.testing.assert_array_equal(max_roi_pool_session((1, 4), 1.0)(image, boxes)[0, 0],
                                  [[0, 0, 0, 1]])
