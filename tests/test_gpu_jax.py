"""pydeform.jax on JAX GPU arrays (needs a GPU and a CUDA build of jaxlib): the cases of
tests/test_jax_ops.py eagerly, under jit and grad under jit, on both GPU backends, against the
NumPy API; float16 / bfloat16 against the CuPy API (the semi-convolutional ops on the Numba CUDA
kernels too, which read and write float32 copies XLA provides); CenterNet (decode, focal loss,
targets). CPU-side twins: tests/test_jax_ops.py, tests/test_jax_centernet.py,
tests/test_jax_gpu_glue.py and tests/test_jax_workspace.py."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pydeform  # noqa: E402
import pydeform.jax as pdj  # noqa: E402
from tests.test_jax_ops import CASES, IDS, off_integer  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("this jaxlib has no GPU backend (install jax[cuda12])")


@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_ops_and_gradients_match_the_numpy_api(gpu, case, backend):
    expected = case.numpy()
    names = list(case.arrays)
    values = [jax.device_put(a, gpu) for a in case.arrays.values()]
    op = getattr(pdj, case.name)

    def function(*args):
        return op(**dict(zip(names, args)), **case.static, backend=backend)

    out = function(*values)
    assert out.devices() == {gpu}
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(function)(*values)), expected, rtol=1e-10, atol=1e-12)
    cotangent = np.random.default_rng(5).standard_normal(expected.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(function(*a) * cotangent), argnums=tuple(range(len(names)))))(*values)
    expected_grads = case.numpy_grads(cotangent)
    for name, grad in zip(names, grads):
        if name in expected_grads:
            np.testing.assert_allclose(np.asarray(grad), expected_grads[name], rtol=1e-9, atol=1e-10)
    for value, original in zip(values, case.arrays.values()):
        np.testing.assert_array_equal(np.asarray(value), original)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_match_the_cupy_api(gpu, dtype):
    import cupy as cp

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 9, 9))
    offset = off_integer(rng, (2, 18, 9, 9))
    weight = 0.3 * rng.standard_normal((6, 4, 3, 3))
    bias = rng.standard_normal(6)
    arrays = [jax.device_put(jnp.asarray(a, dtype=dtype), gpu) for a in (x, offset, weight, bias)]
    out = pdj.deform_conv2d(*arrays, padding=1)
    assert out.dtype == jnp.dtype(dtype)
    cupy_arrays = [cp.from_dlpack(a) for a in arrays]
    expected = pydeform.deform_conv2d(*cupy_arrays, padding=1)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), cp.asnumpy(expected.astype(cp.float32)),
                               rtol=2e-2, atol=2e-2)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(pdj.deform_conv2d(*a, padding=1).astype(jnp.float32)),
                             argnums=(0, 1, 2, 3)))(*arrays)
    expected_grads = pydeform.deform_conv2d_backward(cp.ones_like(expected), *cupy_arrays, padding=1)
    for grad, want in zip(grads, expected_grads[:4]):
        assert grad.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), cp.asnumpy(want.astype(cp.float32)),
                                   rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_semiconv_half_types_on_the_numba_backend_match_the_cupy_api(gpu, dtype):
    import cupy as cp

    rng = np.random.default_rng(10)
    floats = {"psi": rng.standard_normal((2, 3, 8, 9)), "centers": rng.standard_normal((2, 4, 3)),
              "sigma": rng.uniform(0.5, 2.0, (2, 4))}
    arrays = {name: jax.device_put(jnp.asarray(a, dtype=dtype), gpu) for name, a in floats.items()}
    labels, foreground = rng.integers(0, 4, (2, 8, 9)).astype(np.int32), rng.random((2, 8, 9)) < 0.6
    arrays.update(labels=jax.device_put(labels, gpu), foreground=jax.device_put(foreground, gpu))
    on_cupy = {name: cp.from_dlpack(arrays[name]) for name in floats}
    on_cupy.update(labels=cp.asarray(labels), foreground=cp.asarray(foreground))

    def close(actual, expected):
        np.testing.assert_allclose(np.asarray(actual.astype(jnp.float32)), cp.asnumpy(expected.astype(cp.float32)),
                                   rtol=2e-2, atol=2e-2)

    def loss(psi):
        return pdj.instance_mean_loss(psi, arrays["labels"], 4, coordinates=True, backend="numba").astype(jnp.float32)

    close(loss(arrays["psi"]), pydeform.instance_mean_loss(on_cupy["psi"], on_cupy["labels"], 4, coordinates=True))
    close(jax.jit(jax.grad(loss))(arrays["psi"]),
          pydeform.instance_mean_loss_backward(1.0, on_cupy["psi"], on_cupy["labels"], 4, coordinates=True))

    def affinity_sum(psi, centers, sigma):
        return jnp.sum(pdj.affinity(psi, centers, sigma, backend="numba").astype(jnp.float32))

    expected = pydeform.affinity(on_cupy["psi"], on_cupy["centers"], on_cupy["sigma"])
    close(pdj.affinity(arrays["psi"], arrays["centers"], arrays["sigma"], backend="numba"), expected)
    grads = jax.jit(jax.grad(affinity_sum, argnums=(0, 1, 2)))(arrays["psi"], arrays["centers"], arrays["sigma"])
    for grad, want in zip(grads, pydeform.affinity_backward(cp.ones_like(expected), on_cupy["psi"], on_cupy["centers"],
                                                            on_cupy["sigma"])):
        close(grad, want)
    votes = pdj.hough_votes(arrays["psi"], arrays["foreground"], coordinates=True, backend="numba")
    np.testing.assert_array_equal(np.asarray(votes), cp.asnumpy(
        pydeform.hough_votes(on_cupy["psi"], on_cupy["foreground"], coordinates=True)))
    assigned = pdj.assign_to_centers(arrays["psi"], arrays["foreground"], arrays["centers"], backend="numba")
    np.testing.assert_array_equal(np.asarray(assigned), cp.asnumpy(
        pydeform.assign_to_centers(on_cupy["psi"], on_cupy["foreground"], on_cupy["centers"])))


def test_centernet_on_the_gpu(gpu):
    rng = np.random.default_rng(9)
    heat, wh = rng.uniform(0, 1, (2, 3, 16, 16)), rng.uniform(1, 5, (2, 2, 16, 16))
    expected = pydeform.centernet_decode(heat, wh, K=20)
    out = jax.jit(lambda h, w: pdj.centernet_decode(h, w, K=20))(jax.device_put(heat, gpu), jax.device_put(wh, gpu))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12)
    pred = rng.uniform(0.05, 0.95, heat.shape)
    target = np.where(rng.uniform(size=heat.shape) > 0.9, 1.0, 0.5 * heat)
    grad = jax.jit(jax.grad(pdj.centernet_focal_loss))(jax.device_put(pred, gpu), jax.device_put(target, gpu))
    np.testing.assert_allclose(np.asarray(grad), pydeform.centernet_focal_loss_backward(np.array(1.0), pred, target),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_centernet_targets_on_the_gpu(gpu, backend):
    """XLA's buffers hold the targets; int32 labels go through the planned int64 scratch."""
    rng = np.random.default_rng(10)
    corner = rng.uniform(0, 40, (2, 6, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(2, 20, (2, 6, 2))], axis=2)
    labels = rng.integers(-1, 3, (2, 6))
    expected = pydeform.centernet_targets(boxes, labels, 3, (16, 16), max_objects=5)
    function = jax.jit(lambda b, l: pdj.centernet_targets(b, l, 3, (16, 16), max_objects=5, backend=backend))
    got = function(jax.device_put(boxes, gpu), jax.device_put(labels.astype(np.int32), gpu))
    for name, value in expected._asdict().items():
        assert getattr(got, name).devices() == {gpu}, name
        np.testing.assert_allclose(np.asarray(getattr(got, name)), value, rtol=1e-12, err_msg=name)
