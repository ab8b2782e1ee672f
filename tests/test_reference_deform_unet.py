"""The reference Deformable U-Net operators: deform_conv_transpose2d against deformable
convolution (the adjoint identity) and torch's conv_transpose2d, deform_pool2d against torch's
avg_pool2d / max_pool2d and depthwise deformable convolution, both backward passes against
float64 central finite differences."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from tests.deform_unet_cases import (
    PoolCase, TransposeCase, deform_conv_transpose_cases, deform_pool_cases, pool_case_from, transpose_case_from,
)
from tests.strategies import build_case

TRANSPOSE_ARRAYS = ("input", "offset", "weight", "bias", "mask")


def fixed_conv_case(seed, n=2, with_mask=True, with_bias=True, **geometry):
    """A deform_conv2d gradient case with every dimension > 1 unless overridden."""
    options = dict(channels=4, out_channels=6, size=(7, 7), kernel=(3, 2), groups=2, offset_groups=2,
                   stride=2, padding=(1, 0), dilation=(1, 2))
    options.update(geometry)
    return build_case(np.random.default_rng(seed), n=n, with_mask=with_mask, with_bias=with_bias, **options)


def fixed_transpose_case(seed, **geometry) -> TransposeCase:
    return transpose_case_from(fixed_conv_case(seed, **geometry), np.random.default_rng(seed + 1))


def fixed_pool_case(seed, mode, **geometry) -> PoolCase:
    return pool_case_from(fixed_conv_case(seed, **geometry), mode, np.random.default_rng(seed + 1))


@settings(max_examples=60)
@given(case=deform_conv_transpose_cases(with_grad=True, min_batch=1))
def test_transpose_is_the_adjoint_of_deform_conv2d(case):
    """<deform_conv2d(y), x> == <y, deform_conv_transpose2d(x)> for any offsets, masks,
    strides, dilations, groups and offset groups (no bias: the adjoint part alone)."""
    x, y = case.input, case.grad_output
    options = {k: v for k, v in case.options().items() if k not in ("output_padding", "groups")}
    conv = reference.deform_conv2d(y, case.offset, case.weight, mask=case.mask, **options)
    transposed = reference.deform_conv_transpose2d(**{**case.arguments(), "bias": None})
    left, right = np.sum(conv * x), np.sum(y * transposed)
    assert left == pytest.approx(right, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("geometry", [
    dict(),
    dict(groups=1, offset_groups=1, stride=1, padding=0, dilation=1, kernel=(3, 3)),
    dict(stride=(2, 3), padding=(2, 1), dilation=(2, 1), size=(9, 8)),
    dict(channels=3, out_channels=2, groups=1, offset_groups=3, kernel=(1, 1), stride=(3, 2), padding=0, dilation=1),
])
@pytest.mark.parametrize("unit_mask", [False, True])
def test_transpose_with_zero_offsets_is_conv_transpose2d(geometry, unit_mask):
    case = fixed_transpose_case(3, **geometry)
    zero = np.zeros_like(case.offset)
    mask = np.ones_like(case.mask) if unit_mask else None
    got = reference.deform_conv_transpose2d(**{**case.arguments(), "offset": zero, "mask": mask})
    options = case.options()
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(case.input), torch.from_numpy(case.weight), torch.from_numpy(case.bias), **options)
    assert got.shape == tuple(expected.shape) == case.grad_output.shape
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_transpose_hand_computed_splat():
    """One input pixel, a 1x1 kernel and a fractional offset: its value lands on four output
    pixels with the bilinear weights, times weight and mask; corners past the border are dropped."""
    input = np.array([[[[2.0]]]])
    weight = np.array([[[[3.0]], [[-1.0]]]])  # [Cin=1, Cout=2, 1, 1]
    mask = np.full((1, 1, 1, 1), 0.5)
    offset = np.array([1.25, 0.5]).reshape(1, 2, 1, 1)
    out = reference.deform_conv_transpose2d(input, offset, weight, mask=mask, stride=3, output_padding=2)
    assert out.shape == (1, 2, 3, 3)  # (1 - 1)*3 + 0 + 2 + 1
    splat = np.zeros((3, 3))
    splat[1, 0] = splat[1, 1] = 0.75 * 0.5
    splat[2, 0] = splat[2, 1] = 0.25 * 0.5
    np.testing.assert_allclose(out[0], np.stack([3.0, -1.0])[:, None, None] * 2.0 * 0.5 * splat, rtol=1e-14)
    # Left of column 0: only the corners in column 0 receive anything.
    offset = np.array([1.25, -0.5]).reshape(1, 2, 1, 1)
    out = reference.deform_conv_transpose2d(input, offset, weight, mask=mask, stride=3, output_padding=2)
    splat = np.zeros((3, 3))
    splat[1, 0], splat[2, 0] = 0.75 * 0.5, 0.25 * 0.5
    np.testing.assert_allclose(out[0, 0], 3.0 * splat, rtol=1e-14)


def test_transpose_empty_batch():
    case = fixed_transpose_case(5, n=0)
    out = reference.deform_conv_transpose2d(**case.arguments())
    assert out.shape == case.grad_output.shape == (0, 4, 7, 7)
    grads = case.reference_backward()
    for name in TRANSPOSE_ARRAYS:
        assert grads[name].shape == getattr(case, name).shape
    assert not grads["weight"].any() and not grads["bias"].any()


TRANSPOSE_GRADIENT_CASES = [
    (seed, geometry, name)
    for seed, geometry in enumerate([
        dict(),
        dict(with_mask=False, with_bias=False, stride=1, padding=1, dilation=1, kernel=(3, 3)),
        dict(channels=6, out_channels=3, groups=3, offset_groups=3, stride=(1, 2), size=(6, 7)),
    ])
    for name in TRANSPOSE_ARRAYS if name not in ("bias", "mask") or geometry.get("with_mask", True)
]


@pytest.mark.parametrize("seed, geometry, name", TRANSPOSE_GRADIENT_CASES,
                         ids=[f"{seed}-{name}" for seed, _, name in TRANSPOSE_GRADIENT_CASES])
def test_transpose_directional_derivatives(seed, geometry, name):
    """<grad, v> equals the central difference of <grad_output, forward> along a random v."""
    case = fixed_transpose_case(10 + seed, **geometry)
    _check_directional_derivative(case, name, reference.deform_conv_transpose2d,
                                  case.reference_backward()[name], np.random.default_rng(seed))


def _check_directional_derivative(case, name, forward, analytic_grad, rng):
    arguments = case.arguments()
    direction = rng.standard_normal(arguments[name].shape)
    analytic = np.sum(analytic_grad * direction)

    def loss(step):
        moved = {**arguments, name: arguments[name] + step * direction}
        return np.sum(case.grad_output * forward(**moved))

    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


POOL_GRADIENT_CASES = [
    (seed, geometry, mode, name)
    for seed, geometry in enumerate([
        dict(),
        dict(with_mask=False, stride=1, padding=1, dilation=1, kernel=(3, 3), offset_groups=1),
        dict(channels=6, offset_groups=3, stride=(1, 2), size=(6, 7), kernel=(2, 2)),
    ])
    for mode in ("avg", "max")
    for name in ("input", "offset", "mask") if name != "mask" or geometry.get("with_mask", True)
]


@pytest.mark.parametrize("seed, geometry, mode, name", POOL_GRADIENT_CASES,
                         ids=[f"{seed}-{mode}-{name}" for seed, _, mode, name in POOL_GRADIENT_CASES])
def test_pool_directional_derivatives(seed, geometry, mode, name):
    case = fixed_pool_case(20 + seed, mode, **geometry)
    _check_directional_derivative(case, name, reference.deform_pool2d, case.reference_backward()[name],
                                  np.random.default_rng(seed))


@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), stride=2, padding=0, dilation=1, size=(7, 8)),
    dict(kernel=(2, 3), stride=(2, 1), padding=0, dilation=1, size=(6, 5)),
    dict(kernel=(1, 1), stride=1, padding=0, dilation=1, size=(3, 4)),
])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("unit_mask", [False, True])
def test_pool_with_zero_offsets_is_torch_pooling(geometry, mode, unit_mask):
    case = fixed_pool_case(4, mode, **geometry)
    zero = np.zeros_like(case.offset)
    mask = np.ones_like(case.mask) if unit_mask else None
    got = reference.deform_pool2d(**{**case.arguments(), "offset": zero, "mask": mask})
    pool = torch.nn.functional.avg_pool2d if mode == "avg" else torch.nn.functional.max_pool2d
    expected = pool(torch.from_numpy(case.input), case.kernel_size, stride=case.stride)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-13, atol=1e-14)


@settings(max_examples=40)
@given(case=deform_pool_cases(mode="avg", min_batch=1))
def test_avg_pool_is_depthwise_deform_conv2d(case):
    """avg mode = deform_conv2d with one weight 1/(kh*kw) per channel (groups = C)."""
    channels = case.input.shape[1]
    kh, kw = (case.kernel_size, case.kernel_size) if isinstance(case.kernel_size, int) else case.kernel_size
    weight = np.full((channels, 1, kh, kw), 1.0 / (kh * kw))
    stride = (kh, kw) if case.stride is None else case.stride
    expected = reference.deform_conv2d(case.input, case.offset, weight, stride=stride, padding=case.padding,
                                       dilation=case.dilation, mask=case.mask)
    np.testing.assert_allclose(reference.deform_pool2d(**case.arguments()), expected, rtol=1e-12, atol=1e-13)


def tie_problem(values):
    """A row of ones pooled by one 1x(len(values)) window, zero offsets: point k samples a 1,
    times its mask entry, so v_k = values[k] exactly."""
    points = len(values)
    mask = np.asarray(values, dtype=np.float64).reshape(1, points, 1, 1)
    return dict(input=np.ones((1, 1, 1, points)), offset=np.zeros((1, 2 * points, 1, 1)), mask=mask,
                kernel_size=(1, points))


@pytest.mark.parametrize("values, index", [
    ([1.0, 3.0, 3.0, 2.0], 1),            # a tie: the lowest k
    ([-2.0, -2.0, -2.0], 0),
    ([1.0, np.nan, 5.0, np.nan], 1),      # NaN wins over any number: the first NaN
    ([np.inf, np.nan], 1),
    ([-np.inf, -5.0], 1),
])
def test_max_ties_and_nan(values, index):
    problem = tie_problem(values)
    out, indices = reference.deform_pool2d(**problem, return_indices=True)
    assert indices.dtype == np.int32 and indices.shape == (1, 1, 1, 1) and indices[0, 0, 0, 0] == index
    np.testing.assert_array_equal(out[0, 0, 0, 0], values[index])
    grads = reference.deform_pool2d_backward(np.ones((1, 1, 1, 1)), **problem)
    expected_mask = np.zeros(len(values))
    expected_mask[index] = 1.0  # d out / d m_k = B_A = 1 at the arg-max point only
    np.testing.assert_array_equal(grads["mask"].ravel(), expected_mask)
    if np.isnan(values[index]):
        return  # a NaN gradient spreads to the zero-weight corners too
    # d out / d input: m at the pixel the arg-max point samples, nothing from the others.
    expected_input = np.zeros(len(values))
    expected_input[index] = values[index]
    np.testing.assert_array_equal(grads["input"].ravel(), expected_input)
