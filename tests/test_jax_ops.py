"""pydeform.jax on JAX CPU arrays: every differentiable op eagerly, under jax.jit, jax.grad under
jit, vmap and check_grads in float64, against the NumPy API; inputs unchanged."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pydeform  # noqa: E402
import pydeform.jax as pdj  # noqa: E402

jax.config.update("jax_enable_x64", True)


class Case:
    """One op call: ``arrays`` (NumPy, float64) in the API's argument order, ``static`` keyword
    arguments; ``grad_names`` the arrays the op differentiates (the boxes get zeros)."""

    def __init__(self, name, forward, backward, arrays, static, grad_names):
        self.name, self.forward, self.backward = name, forward, backward
        self.arrays, self.static, self.grad_names = arrays, static, grad_names

    def numpy(self):
        return self.forward(**self.arrays, **self.static)

    def numpy_grads(self, grad_output):
        grads = self.backward(grad_output, **self.arrays, **self.static)
        return {name: getattr(grads, name) for name in self.grad_names}

    def jax_function(self):
        op = getattr(pdj, self.name)
        names = list(self.arrays)
        return lambda *values: op(**dict(zip(names, values)), **self.static)

    def jax_arrays(self):
        return [jnp.asarray(a) for a in self.arrays.values()]


def assert_matches(actual, expected):
    """Equal up to the last bits: the BLAS GEMM of deform_conv2d may block differently for XLA's
    buffers than for NumPy's (alignment), so sums can round differently."""
    tolerance = 1e-12 if np.dtype(expected.dtype) == np.float64 else 1e-5
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=tolerance, atol=tolerance)


def off_integer(rng, shape, low=-2, high=2):
    """Values whose fractional part lies in [0.2, 0.8]: samples stay away from the bilinear kinks."""
    return rng.integers(low, high, shape) + rng.uniform(0.2, 0.8, shape)


def build_cases():
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((2, 4, 7, 7))
    rois = np.array([[0, 0.6, 1.3, 5.2, 4.7], [1, 2.1, 0.4, 6.3, 5.6], [1, 1.1, 1.9, 3.7, 6.2]])
    k = rois.shape[0]
    cases = [
        Case("deform_conv2d", pydeform.deform_conv2d, pydeform.deform_conv2d_backward,
             dict(input=x, offset=off_integer(rng, (2, 18, 7, 7)), weight=rng.standard_normal((4, 2, 3, 3)),
                  bias=rng.standard_normal(4), mask=rng.uniform(0.1, 1.0, (2, 9, 7, 7))),
             dict(padding=1), ("input", "offset", "weight", "bias", "mask")),
        Case("deform_conv2d", pydeform.deform_conv2d, pydeform.deform_conv2d_backward,
             dict(input=x, offset=off_integer(rng, (2, 8, 6, 6)), weight=rng.standard_normal((3, 4, 2, 2))),
             dict(stride=1), ("input", "offset", "weight")),
        Case("roi_align", pydeform.roi_align, pydeform.roi_align_backward, dict(input=x, rois=rois),
             dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True), ("input",)),
        Case("roi_align", pydeform.roi_align, pydeform.roi_align_backward, dict(input=x, rois=rois),
             dict(output_size=2, sampling_ratio=2, mode="max"), ("input",)),
        Case("ps_roi_align", pydeform.ps_roi_align, pydeform.ps_roi_align_backward,
             dict(input=rng.standard_normal((2, 8, 7, 7)), rois=rois), dict(output_size=2, sampling_ratio=2),
             ("input",)),
        Case("roi_pool", pydeform.roi_pool, pydeform.roi_pool_backward, dict(input=x, rois=rois),
             dict(output_size=2), ("input",)),
        Case("ps_roi_pool", pydeform.ps_roi_pool, pydeform.ps_roi_pool_backward,
             dict(input=rng.standard_normal((2, 8, 7, 7)), rois=rois), dict(output_size=2), ("input",)),
        Case("deform_roi_pool", pydeform.deform_roi_pool, pydeform.deform_roi_pool_backward,
             dict(input=x, rois=rois, offset=rng.uniform(-0.3, 0.3, (k, 2, 2, 2)),
                  mask=rng.uniform(0.2, 1.0, (k, 1, 2, 2))),
             dict(output_size=2, sampling_ratio=2, gamma=0.1), ("input", "offset", "mask")),
        Case("deform_psroi_pool", pydeform.deform_psroi_pool, pydeform.deform_psroi_pool_backward,
             dict(input=rng.standard_normal((2, 8, 7, 7)), rois=rois, trans=rng.uniform(-0.5, 0.5, (k, 2, 2, 2))),
             dict(group_size=2, pooled_size=2, sample_per_part=2, trans_std=0.1), ("input", "trans")),
    ]
    # The Deformable U-Net ops.
    cases += [
        Case("deform_conv_transpose2d", pydeform.deform_conv_transpose2d, pydeform.deform_conv_transpose2d_backward,
             dict(input=rng.standard_normal((2, 4, 4, 3)), offset=off_integer(rng, (2, 16, 4, 3)),
                  weight=rng.standard_normal((4, 3, 2, 2)), bias=rng.standard_normal(6),
                  mask=rng.uniform(0.1, 1.0, (2, 8, 4, 3))),
             dict(stride=2, padding=(1, 0), output_padding=(1, 0), groups=2), ("input", "offset", "weight", "bias",
                                                                               "mask")),
        Case("deform_pool2d", pydeform.deform_pool2d, pydeform.deform_pool2d_backward,
             dict(input=x, offset=off_integer(rng, (2, 36, 3, 3)), mask=rng.uniform(0.1, 1.0, (2, 18, 3, 3))),
             dict(kernel_size=3, stride=2, padding=0, mode="max"), ("input", "offset", "mask")),
        Case("deform_pool2d", pydeform.deform_pool2d, pydeform.deform_pool2d_backward,
             dict(input=x, offset=off_integer(rng, (2, 8, 4, 4))), dict(kernel_size=2, padding=1, mode="avg"),
             ("input", "offset")),
    ]
    return cases


CASES = build_cases()
IDS = [f"{c.name}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eager_and_jit_equal_the_numpy_api(case):
    expected = case.numpy()
    originals = [a.copy() for a in case.arrays.values()]
    values = case.jax_arrays()
    function = case.jax_function()
    eager = function(*values)
    assert isinstance(eager, jax.Array) and eager.dtype == jnp.float64
    assert_matches(eager, expected)
    assert_matches(jax.jit(function)(*values), expected)
    for value, original in zip(values, originals):
        np.testing.assert_array_equal(np.asarray(value), original)
    for value, original in zip(case.arrays.values(), originals):
        np.testing.assert_array_equal(value, original)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_under_jit_equals_the_numpy_backward(case):
    cotangent = np.random.default_rng(5).standard_normal(case.numpy().shape)
    names = list(case.arrays)
    function = case.jax_function()

    def loss(*values):
        return jnp.sum(function(*values) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*case.jax_arrays())
    expected = case.numpy_grads(cotangent)
    for name, grad in zip(names, grads):
        assert grad.shape == case.arrays[name].shape
        if name in expected:
            np.testing.assert_allclose(np.asarray(grad), expected[name], rtol=1e-12, atol=1e-12)
        else:  # the boxes
            np.testing.assert_array_equal(np.asarray(grad), 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_grads_reverse_mode(case):
    names = list(case.arrays)
    differentiable = [i for i, name in enumerate(names) if name in case.grad_names]
    values = case.jax_arrays()
    function = case.jax_function()

    def of_differentiable(*diff_values):
        all_values = list(values)
        for i, v in zip(differentiable, diff_values):
            all_values[i] = v
        return function(*all_values)

    check_grads(of_differentiable, [values[i] for i in differentiable], order=1, modes=["rev"])


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("deform_conv2d", "roi_align", "deform_roi_pool",
                                                             "deform_conv_transpose2d", "deform_pool2d")],
                         ids=lambda c: c.name)
def test_vmap_maps_sequentially(case):
    """vmap over a new leading axis of the first argument equals one call per element."""
    names = list(case.arrays)
    values = case.jax_arrays()
    function = case.jax_function()
    stacked = jnp.stack([values[0], 2.0 * values[0] + 1.0])
    mapped = jax.jit(jax.vmap(lambda first: function(first, *values[1:])))(stacked)
    for i in range(2):
        arrays = dict(case.arrays, **{names[0]: np.asarray(stacked[i])})
        assert_matches(mapped[i], case.forward(**arrays, **case.static))
    grads = jax.vmap(jax.grad(lambda first: jnp.sum(function(first, *values[1:]))))(stacked)
    for i in range(2):
        arrays = dict(case.arrays, **{names[0]: np.asarray(stacked[i])})
        expected = case.backward(np.ones(case.numpy().shape), **arrays, **case.static)
        np.testing.assert_allclose(np.asarray(grads[i]), getattr(expected, names[0]), rtol=1e-12, atol=1e-12)


def test_list_rois_equal_the_batch_index_form():
    case = CASES[2]
    x = jnp.asarray(case.arrays["input"])
    rois = case.arrays["rois"]
    per_image = [jnp.asarray(rois[rois[:, 0] == i, 1:]) for i in range(2)]
    np.testing.assert_array_equal(np.asarray(pdj.roi_align(x, per_image, **case.static)),
                                  np.asarray(pdj.roi_align(x, jnp.asarray(rois), **case.static)))


def test_float32_and_empty_batches():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    offset = off_integer(rng, (1, 18, 5, 5)).astype(np.float32)
    weight = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    out = pdj.deform_conv2d(jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight), padding=1)
    assert out.dtype == jnp.float32
    assert_matches(out, pydeform.deform_conv2d(x, offset, weight, padding=1))
    empty = pdj.roi_align(jnp.asarray(x), jnp.zeros((0, 5), jnp.float32), 2)
    assert empty.shape == (0, 2, 2, 2)
    grad = jax.grad(lambda a: pdj.roi_align(a, jnp.zeros((0, 5), jnp.float32), 2).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), 0)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, o, w: pdj.deform_conv2d(x, o, w[0]), ValueError, "weight: expected a 4-d array"),
        (lambda x, o, w: pdj.deform_conv2d(x, o[:, :4], w), ValueError, "offset: shape[1]"),
        (lambda x, o, w: pdj.deform_conv2d(x, o, w, stride=0), ValueError, "stride"),
        (lambda x, o, w: pdj.deform_conv2d(x, o.astype(jnp.float32), w), TypeError, "offset: expected dtype float64"),
        (lambda x, o, w: pdj.deform_conv2d(x.astype(jnp.int32), o, w), TypeError, "input: expected a floating"),
        (lambda x, o, w: pdj.deform_conv2d(None, o, w), TypeError, "input: expected an array, got None"),
        (lambda x, o, w: pdj.deform_conv2d(x, o, w, backend="cuda"), ValueError, "backend: expected None"),
        (lambda x, o, w: pdj.deform_conv2d(x, o, w, backend="cupy"), ValueError, "backend: 'cupy' runs on CuPy"),
        (lambda x, o, w: pdj.deform_conv2d(x.astype(jnp.float32), o, w), TypeError,
         "share one dtype (got input float32, offset float64, weight float64)"),
        (lambda x, o, w: pdj.roi_align(x, jnp.zeros((2, 4)), 2), ValueError, "rois: expected a [K, 5] array"),
        (lambda x, o, w: pdj.roi_align(x, jnp.zeros((2, 5), jnp.float32), 2), TypeError,
         "rois: expected dtype float64 like input, got float32"),
        (lambda x, o, w: pdj.roi_align(x, [jnp.zeros((2, 4), jnp.float32)], 2), TypeError,
         "rois[0]: expected dtype float64 like input, got float32"),
        (lambda x, o, w: pdj.roi_align(x, jnp.zeros((2, 5)), 2, mode="sum"), ValueError, "mode"),
        (lambda x, o, w: pdj.deform_roi_pool(x, jnp.zeros((2, 5)), offset=jnp.zeros((2, 2, 3, 3))), ValueError,
         "offset: expected shape (2, 2, 7, 7)"),
    ],
)
def test_bad_arguments_raise_at_trace_time(call, error, words):
    x = jnp.zeros((1, 2, 5, 5))
    offset = jnp.zeros((1, 18, 5, 5))
    weight = jnp.zeros((2, 2, 3, 3))
    with pytest.raises(error) as raised:
        call(x, offset, weight)
    assert words in str(raised.value)
    with pytest.raises(error):
        jax.jit(call)(x, offset, weight)


BAD_ROWS = [[1.0, 0.5, 0.5, 3.0, 3.0], [0.5, 0.5, 0.5, 3.0, 3.0], [0.0, np.nan, 0.5, 3.0, 3.0]]


@pytest.mark.parametrize("row", BAD_ROWS, ids=["index-out-of-range", "index-not-integer", "nan"])
def test_bad_box_values_raise_value_error_eagerly(row):
    """As the array API does; the check runs before anything is launched."""
    x = jnp.zeros((1, 2, 5, 5))
    rois = jnp.asarray([[0.0, 1.0, 1.0, 4.0, 4.0], row])
    with pytest.raises(ValueError, match=r"rois: row 1 = .* must have an integer batch index in \[0, 1\)"):
        pdj.roi_align(x, rois, 2)
    with pytest.raises(ValueError, match=r"rois: row 1 = .* must have an integer batch index in \[0, 1\)"):
        jax.grad(lambda a: pdj.roi_align(a, rois, 2).sum())(x)
    if np.isnan(row[1]):
        with pytest.raises(ValueError, match=r"rois: row 0 = \[0\.0, nan"):
            pdj.roi_align(x, [jnp.asarray([row[1:]])], 2)


def test_bad_box_values_under_jit_give_zero_rows_and_no_gradient():
    """Traced values are not checked: a bad row gives zeros and no gradient, the others are as eager."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 2, 5, 5)))
    good = [[0.0, 1.0, 1.0, 4.0, 4.0], [0.0, 0.5, 2.0, 3.5, 4.5]]
    rois = jnp.asarray(good[:1] + BAD_ROWS + good[1:])

    def loss(a, r):
        return (pdj.roi_align(a, r, 2, sampling_ratio=2) ** 2).sum()

    out = jax.jit(lambda a, r: pdj.roi_align(a, r, 2, sampling_ratio=2))(x, rois)
    np.testing.assert_array_equal(np.asarray(out[1:4]), 0.0)
    expected = pdj.roi_align(x, jnp.asarray(good), 2, sampling_ratio=2)
    np.testing.assert_allclose(np.asarray(out[jnp.array([0, 4])]), np.asarray(expected), rtol=1e-12)
    grad = jax.jit(jax.grad(loss))(x, rois)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(loss)(x, jnp.asarray(good))), rtol=1e-12)


def test_boxes_as_lists_of_numbers():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 5, 5)))
    rows = [[0, 1.0, 1.0, 4.0, 4.0], [1, 0.5, 2.0, 3.5, 4.5]]
    expected = np.asarray(pdj.roi_align(x, jnp.asarray(rows), 2, sampling_ratio=2))
    for rois in (rows, [[rows[0][1:]], [rows[1][1:]]], [[], [rows[1][1:]]]):
        got = pdj.roi_align(x, rois, 2, sampling_ratio=2)
        np.testing.assert_array_equal(np.asarray(got), expected[-len(got):])
    jitted = jax.jit(lambda a: pdj.roi_align(a, rows, 2, sampling_ratio=2))(x)
    np.testing.assert_array_equal(np.asarray(jitted), expected)


def test_deterministic_is_a_static_backward_argument():
    """``deterministic`` reaches the backward only (the forward has none) and is checked once;
    on the CPU both modes give the same bits (the Numba CPU backward is deterministic)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 0.5, 1.0, 4.5, 5.0], [0, 1.0, 0.5, 3.0, 4.0]])
    grads = [
        jax.jit(jax.grad(lambda v, d=d: pdj.roi_align(v, jnp.asarray(rois), 2, sampling_ratio=0,
                                                      deterministic=d).sum()))(jnp.asarray(x))
        for d in (False, True)
    ]
    expected = pydeform.roi_align_backward(np.ones((2, 2, 2, 2)), x, rois, 2, sampling_ratio=0, deterministic=True)
    assert np.asarray(grads[0]).tobytes() == np.asarray(grads[1]).tobytes() == expected.input.tobytes()
    offset = rng.standard_normal((1, 18, 6, 6))
    weight = rng.standard_normal((3, 2, 3, 3))
    grad = jax.grad(lambda v: pdj.deform_conv2d(v, jnp.asarray(offset), jnp.asarray(weight), padding=1,
                                                deterministic=True).sum())(jnp.asarray(x))
    expected = pydeform.deform_conv2d_backward(np.ones((1, 3, 6, 6)), x, offset, weight, padding=1, deterministic=True)
    np.testing.assert_array_equal(np.asarray(grad), expected.input)
    with pytest.raises(TypeError, match="^deterministic: expected a bool"):
        pdj.roi_pool(jnp.asarray(x), jnp.asarray(rois), 2, deterministic=1)
    with pytest.raises(TypeError, match="^deterministic: expected a bool"):
        pdj.deform_conv2d(jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight), padding=1, deterministic="yes")


def test_deterministic_reaches_the_deform_unet_scatters():
    """deform_conv_transpose2d's ``deterministic`` reaches its forward (the splat), deform_pool2d's
    its backward; checked once; on the CPU the bits are the array API's in either mode."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 2, 4, 4))
    offset = rng.standard_normal((1, 18, 4, 4))
    weight = rng.standard_normal((2, 3, 3, 3))
    expected = pydeform.deform_conv_transpose2d(x, offset, weight, stride=2, padding=1, deterministic=True)
    for deterministic in (False, True):
        got = jax.jit(lambda v, d=deterministic: pdj.deform_conv_transpose2d(
            v, jnp.asarray(offset), jnp.asarray(weight), stride=2, padding=1, deterministic=d))(jnp.asarray(x))
        assert np.asarray(got).tobytes() == expected.tobytes()
    grad = jax.grad(lambda v: pdj.deform_conv_transpose2d(v, jnp.asarray(offset), jnp.asarray(weight), stride=2,
                                                          padding=1, deterministic=True).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), pydeform.deform_conv_transpose2d_backward(
        np.ones(expected.shape), x, offset, weight, stride=2, padding=1).input)
    image = rng.standard_normal((1, 2, 8, 8))
    pool_offset = rng.standard_normal((1, 18, 4, 4))
    for mode in ("avg", "max"):
        grad = jax.jit(jax.grad(lambda v, m=mode: pdj.deform_pool2d(
            v, jnp.asarray(pool_offset), 3, stride=2, padding=1, mode=m, deterministic=True).sum()))(
            jnp.asarray(image))
        expected_grads = pydeform.deform_pool2d_backward(np.ones((1, 2, 4, 4)), image, pool_offset, 3, stride=2,
                                                         padding=1, mode=mode, deterministic=True)
        assert np.asarray(grad).tobytes() == expected_grads.input.tobytes()
    with pytest.raises(TypeError, match="^deterministic: expected a bool"):
        pdj.deform_conv_transpose2d(jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight), deterministic=1)
    with pytest.raises(TypeError, match="^deterministic: expected a bool"):
        pdj.deform_pool2d(jnp.asarray(image), jnp.asarray(pool_offset), 3, stride=2, padding=1, deterministic=None)
