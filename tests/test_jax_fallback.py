"""pydeform.jax on a JAX without buffer_callback (forced by patching the feature probe): eager
calls go through DLPack, traced ones through pure_callback, with one warning."""

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pydeform  # noqa: E402
import pydeform.jax as pdj  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def no_buffer_callback(monkeypatch):
    monkeypatch.setattr(pdj, "buffer_callback_available", lambda: False)
    monkeypatch.setattr(pdj, "_fallback_warned", False)


def case():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 6, 6))
    offset = rng.integers(-1, 2, (2, 18, 6, 6)) + rng.uniform(0.2, 0.8, (2, 18, 6, 6))
    weight = rng.standard_normal((2, 3, 3, 3))
    rois = np.array([[0, 0.7, 1.1, 4.6, 5.2], [1, 1.3, 0.4, 5.1, 3.8]])
    return x, offset, weight, rois


def test_the_feature_probe_sees_this_jax():
    from jax.experimental import buffer_callback  # noqa: F401  (JAX 0.10 has it)

    assert pdj.buffer_callback_available()


def test_eager_calls_use_dlpack_and_warn_once(no_buffer_callback):
    x, offset, weight, rois = case()
    expected = pydeform.deform_conv2d(x, offset, weight, padding=1)
    with pytest.warns(RuntimeWarning, match="no jax.experimental.buffer_callback"):
        out = pdj.deform_conv2d(jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight), padding=1)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)  # BLAS: last bits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled = pdj.roi_align(jnp.asarray(x), jnp.asarray(rois), 2, sampling_ratio=2)
    np.testing.assert_array_equal(np.asarray(pooled), pydeform.roi_align(x, rois, 2, sampling_ratio=2))


def test_jit_grad_and_vmap_use_pure_callback(no_buffer_callback, monkeypatch):
    x, offset, weight, rois = case()
    values = [jnp.asarray(a) for a in (x, offset, weight)]
    launched = []
    original = jax.pure_callback
    monkeypatch.setattr(jax, "pure_callback", lambda *a, **k: launched.append(1) or original(*a, **k))

    def loss(x, offset, weight):
        return jnp.sum(pdj.deform_conv2d(x, offset, weight, padding=1) ** 2)

    with pytest.warns(RuntimeWarning):
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*values)
    assert launched  # the traced path took pure_callback
    out = pydeform.deform_conv2d(x, offset, weight, padding=1)
    np.testing.assert_allclose(float(value), float(np.sum(out ** 2)), rtol=1e-12)
    expected = pydeform.deform_conv2d_backward(2 * out, x, offset, weight, padding=1)
    for grad, name in zip(grads, ("input", "offset", "weight")):
        np.testing.assert_allclose(np.asarray(grad), getattr(expected, name), rtol=1e-12, atol=1e-12)

    stacked = jnp.stack([values[0], -values[0]])
    mapped = jax.vmap(lambda a: pdj.roi_align(a, jnp.asarray(rois), 2, sampling_ratio=2))(stacked)
    for i, image in enumerate((x, -x)):
        np.testing.assert_array_equal(np.asarray(mapped[i]), pydeform.roi_align(image, rois, 2, sampling_ratio=2))


def test_centernet_targets_fall_back_eagerly_and_under_jit(no_buffer_callback):
    boxes = np.array([[[2.0, 3.0, 14.5, 11.0], [10.0, 8.0, 30.0, 20.0]]])
    labels = np.array([[1, 0]])
    expected = pydeform.centernet_targets(boxes, labels, 2, (8, 9), max_objects=3)
    with pytest.warns(RuntimeWarning):
        eager = pdj.centernet_targets(jnp.asarray(boxes), jnp.asarray(labels), 2, (8, 9), max_objects=3)
    jitted = jax.jit(lambda b, l: pdj.centernet_targets(b, l, 2, (8, 9), max_objects=3))(
        jnp.asarray(boxes), jnp.asarray(labels))
    for got in (eager, jitted):
        for name, value in expected._asdict().items():
            assert isinstance(getattr(got, name), jax.Array), name
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), value, err_msg=name)
