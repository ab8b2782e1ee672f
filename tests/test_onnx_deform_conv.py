"""Cross-check of the reference deformable convolution with ONNX Runtime's CPU DeformConv,
an implementation nobody here wrote.

No disagreement with docs/deform_conv.md was found: ORT zero-pads with the same open square
(-1, H) x (-1, W) (samples exactly at -1 or H read 0), orders each offset pair (dy, dx), lays out
offset and mask channels as g*2*kh*kw + 2*(i*kw + j) and g*kh*kw + i*kw + j, and in float64
matches the reference to rounding. So the tolerances below are rounding only.
"""

from dataclasses import replace

import numpy as np
import pytest

from pydeform._onnx_models import deform_conv_session
from reference import deform_conv2d
from tests.test_reference_deform_conv import GEOMETRIES, Geometry

ONNX_GEOMETRIES = GEOMETRIES + [
    Geometry(n=2, channels=6, height=9, width=7, out_channels=4, kernel=(3, 3), stride=(2, 2),
             padding=(1, 1), groups=2, offset_groups=3, mask=True, bias=True),
    Geometry(n=1, channels=2, height=1, width=5, out_channels=2, kernel=(1, 2), padding=(1, 0)),
]

# float32 compares float32-rounded arguments with their exact float64 result.
TOLERANCES = {np.float32: 1e-5, np.float64: 1e-12}


def rounded_arrays(geometry, rng, dtype):
    """The geometry's arguments, rounded to dtype, with a third of the offsets moved onto whole
    and half pixels, so samples also land exactly on pixel centres and on h, w = -1, H, W."""
    arrays = geometry.arrays(rng)
    offset = arrays["offset"]
    on_grid = rng.random(offset.shape) < 1 / 3
    offset[on_grid] = np.round(2 * offset[on_grid]) / 2
    return {name: array.astype(dtype).astype(np.float64) for name, array in arrays.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("index", range(len(ONNX_GEOMETRIES)))
@pytest.mark.parametrize("with_mask", [False, True], ids=["v1", "v2"])
def test_matches_onnxruntime(index, with_mask, dtype):
    geometry = replace(ONNX_GEOMETRIES[index], mask=with_mask)
    arrays = rounded_arrays(geometry, np.random.default_rng(index), dtype)
    run = deform_conv_session(arrays["weight"].shape, geometry.stride, geometry.padding,
                              geometry.dilation, geometry.groups, geometry.offset_groups,
                              geometry.bias, geometry.mask, dtype)
    actual = run(arrays["input"], arrays["weight"], arrays["offset"], arrays.get("bias"),
                 arrays.get("mask"))
    expected = deform_conv2d(**arrays, **geometry.options())
    assert actual.dtype == dtype and actual.shape == expected.shape
    # Relative to the output's scale: outputs near 0 come from cancelling sums.
    tolerance = TOLERANCES[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max())


def test_onnxruntime_zero_pads_at_minus_one_and_h():
    """The border itself: a sample on h = -1, h = H, w = -1 or w = W reads 0 in ORT too, while
    one a hair inside does not (1x1 kernel, stride (3, 1): one output row of 6 samples)."""
    image = np.arange(1.0, 19.0).reshape(1, 1, 3, 6)
    sample_h = np.array([-1.0, 3.0, 1.0, 1.0, -0.75, 2.75])
    sample_w = np.array([2.0, 2.0, -1.0, 6.0, 2.0, 2.0])
    offset = np.stack([sample_h, sample_w - np.arange(6)])[None, :, None, :]
    weight = np.ones((1, 1, 1, 1))
    run = deform_conv_session(weight.shape, (3, 1), 0, 1, 1, 1, False, False, np.float64)
    actual = run(image, weight, offset)[0, 0, 0]
    # X[0, 2] = 3 and X[2, 2] = 15, each with weight 0.25 from the last two samples.
    np.testing.assert_allclose(actual, [0, 0, 0, 0, 0.75, 3.75], rtol=1e-15)
    np.testing.assert_allclose(deform_conv2d(image, offset, weight, stride=(3, 1))[0, 0, 0], actual,
                               rtol=1e-15)
