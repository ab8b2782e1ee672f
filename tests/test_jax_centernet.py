"""pydeform.jax's CenterNet functions on JAX CPU arrays: centernet_decode and centernet_targets
(no gradient) and the differentiable centernet_focal_loss, eagerly, under jit, grad under jit, vmap and check_grads,
against the NumPy API."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pydeform  # noqa: E402
import pydeform.backends  # noqa: E402
from pydeform import centernet  # noqa: E402
import pydeform.jax as pdj  # noqa: E402

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(21)
HEAT = rng.uniform(0, 1, (2, 3, 9, 8))
WH = rng.uniform(1, 6, (2, 6, 9, 8))
REG = rng.uniform(0, 1, (2, 2, 9, 8))
# Predictions inside the clamp (1e-4, 1 - 1e-4), where the loss is smooth; a few exact positives.
PRED = rng.uniform(0.05, 0.95, (2, 3, 9, 8))
TARGET = np.where(rng.uniform(size=PRED.shape) > 0.95, 1.0, rng.uniform(0, 0.9, PRED.shape))
# Two images of up to five boxes in 32 x 36 pixels (padding label -1), overlapping ones of one class.
BOXES = np.array([
    [[2.0, 3.0, 14.5, 11.0], [10.0, 8.0, 30.0, 20.0], [11.0, 9.0, 29.0, 21.0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[4.0, 4.0, 8.0, 9.0], [20.0, 1.0, 35.0, 30.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
])
LABELS = np.array([[0, 2, 2, -1, -1], [1, 0, -1, -1, -1]])


@pytest.mark.parametrize("settings", [
    dict(K=7),
    dict(K=300, kernel=5, cat_spec_wh=True, down_ratio=4.0, threshold=0.3),
])
def test_decode_eager_jit_vmap_equal_the_numpy_api(settings):
    wh = WH if settings.get("cat_spec_wh") else WH[:, :2]
    expected = pydeform.centernet_decode(HEAT, wh, REG, **settings)
    heat, wh_j, reg = (jnp.asarray(a) for a in (HEAT, wh, REG))
    eager = pdj.centernet_decode(heat, wh_j, reg, **settings)
    assert eager.dtype == jnp.float64 and eager.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(eager), expected)
    jitted = jax.jit(lambda h, w, r: pdj.centernet_decode(h, w, r, **settings))(heat, wh_j, reg)
    np.testing.assert_array_equal(np.asarray(jitted), expected)
    mapped = jax.vmap(lambda h, w, r: pdj.centernet_decode(h[None], w[None], r[None], **settings)[0])(heat, wh_j, reg)
    np.testing.assert_array_equal(np.asarray(mapped), expected)
    np.testing.assert_array_equal(np.asarray(heat), HEAT)


def test_decode_without_reg_has_no_gradient_and_checks_arguments():
    heat, wh = jnp.asarray(HEAT), jnp.asarray(WH[:, :2])
    np.testing.assert_array_equal(np.asarray(pdj.centernet_decode(heat, wh, K=4)),
                                  pydeform.centernet_decode(HEAT, WH[:, :2], K=4))
    grad = jax.grad(lambda h: pdj.centernet_decode(h, wh, K=4)[..., 4].sum())(heat)
    np.testing.assert_array_equal(np.asarray(grad), 0)
    assert pdj.centernet_decode(heat, wh, K=0).shape == (2, 0, 6)
    with pytest.raises(ValueError, match=r"wh: expected shape \(2, 2, 9, 8\), got \(2, 1, 9, 8\)"):
        pdj.centernet_decode(heat, wh[:, :1], K=4)
    with pytest.raises(ValueError, match="kernel"):
        jax.jit(lambda h: pdj.centernet_decode(h, wh, K=4, kernel=2))(heat)
    with pytest.raises(ValueError, match="reg: expected batch size 2 like heat"):
        pdj.centernet_decode(heat, wh, jnp.asarray(REG[:1]), K=4)


def test_focal_loss_eager_jit_and_grad_under_jit():
    pred, target = jnp.asarray(PRED), jnp.asarray(TARGET)
    expected = pydeform.centernet_focal_loss(PRED, TARGET, alpha=2, beta=4)
    loss = pdj.centernet_focal_loss(pred, target)
    assert loss.shape == () and loss.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(loss), expected)
    grad_pred, grad_target = jax.jit(jax.grad(lambda p, t: 3.0 * pdj.centernet_focal_loss(p, t, alpha=1.5),
                                              argnums=(0, 1)))(pred, target)
    np.testing.assert_allclose(
        np.asarray(grad_pred),
        pydeform.centernet_focal_loss_backward(np.array(3.0), PRED, TARGET, alpha=1.5), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(grad_target), 0)
    mapped = jax.vmap(lambda p, t: pdj.centernet_focal_loss(p[None], t[None]))(pred, target)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(mapped[i]), pydeform.centernet_focal_loss(PRED[i:i + 1], TARGET[i:i + 1]))


def test_focal_loss_check_grads():
    target = jnp.asarray(TARGET)
    check_grads(lambda p: pdj.centernet_focal_loss(p, target, beta=3), (jnp.asarray(PRED),), order=1, modes=["rev"])


def test_centernet_buffers_are_exactly_the_planned_ones(monkeypatch):
    """Every CenterNet callback hands the driver XLA's buffers for exactly the slots
    centernet_workspace plans (outputs and scratch), and the results are those buffers."""
    seen = []
    real_provided = pdj.provided

    def recording_provided(buffers):
        seen.append(sorted(buffers))
        return real_provided(buffers)

    monkeypatch.setattr(pdj, "provided", recording_provided)
    pdj._callback.cache_clear()
    kernels = pydeform.backends.centernet_kernels("numpy", "numba")
    heat, wh, pred, target = (jnp.asarray(a) for a in (HEAT, WH[:, :2], PRED, TARGET))
    np.testing.assert_array_equal(np.asarray(pdj.centernet_decode(heat, wh, K=6)),
                                  pydeform.centernet_decode(HEAT, WH[:, :2], K=6))
    jax.grad(pdj.centernet_focal_loss)(pred, target)
    pdj.centernet_targets(jnp.asarray(BOXES), jnp.asarray(LABELS, jnp.int32), 3, (8, 9), max_objects=4)
    decode = centernet.CenterNetDecodeParams(2, 3, 9, 8, 6, 3, False, False, 1.0, False, 0.0)
    focal = centernet.FocalLossParams(2.0, 4.0)
    targets = centernet.CenterNetTargetsParams(2, 5, 3, 8, 9, 4.0, 0.7, 4)
    plans = [
        centernet.centernet_workspace(kernels, decode, np.float64),
        centernet.centernet_workspace(kernels, focal, np.float64, shape=PRED.shape),
        centernet.centernet_workspace(kernels, focal, np.float64, shape=PRED.shape, backward=True),
        centernet.centernet_workspace(kernels, targets, np.float64, labels_dtype=np.int32),
    ]
    assert seen == [sorted({**outputs, **work}) for outputs, work in plans]
    assert "centernet_labels" in plans[-1][1] and "centernet_focal_sums" in plans[1][1]


@pytest.mark.parametrize("labels_dtype", [np.int64, np.int32])
def test_targets_eager_jit_vmap_equal_the_numpy_api(labels_dtype):
    settings = dict(down_ratio=2, min_overlap=0.5, max_objects=4)
    expected = pydeform.centernet_targets(BOXES, LABELS, 3, (8, 9), **settings)
    boxes, labels = jnp.asarray(BOXES), jnp.asarray(LABELS.astype(labels_dtype))
    eager = pdj.centernet_targets(boxes, labels, 3, (8, 9), **settings)
    jitted = jax.jit(lambda b, l: pdj.centernet_targets(b, l, 3, [8, 9], **settings))(boxes, labels)
    mapped = jax.vmap(lambda b, l: pdj.centernet_targets(b[None], l[None], 3, (8, 9), **settings))(boxes, labels)
    for got in (eager, jitted):
        for name, value in expected._asdict().items():
            assert getattr(got, name).dtype == value.dtype, name
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), value, err_msg=name)
    for name, value in expected._asdict().items():
        np.testing.assert_array_equal(np.asarray(getattr(mapped, name))[:, 0], value, err_msg=name)
    # Image 1's second box starts right of the 9-wide grid (x1 / down_ratio = 10) and is skipped.
    np.testing.assert_array_equal(expected.reg_mask, [[1, 1, 1, 0], [1, 0, 0, 0]])


def test_targets_have_no_gradient_and_check_arguments():
    boxes, labels = jnp.asarray(BOXES), jnp.asarray(LABELS)
    grad = jax.grad(lambda b: pdj.centernet_targets(b, labels, 3, 8).wh.sum())(boxes)
    np.testing.assert_array_equal(np.asarray(grad), 0)
    with pytest.raises(TypeError, match="labels: expected an integer dtype, got float64"):
        pdj.centernet_targets(boxes, boxes[..., 0], 3, 8)
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 5\), got \(2, 4\)"):
        pdj.centernet_targets(boxes, labels[:, :4], 3, 8)
    with pytest.raises(ValueError, match="min_overlap"):
        jax.jit(lambda b: pdj.centernet_targets(b, labels, 3, 8, min_overlap=1.5))(boxes)
    with pytest.raises(TypeError, match="labels: expected an array, got None"):
        pdj.centernet_targets(boxes, None, 3, 8)
    with pytest.raises(TypeError, match="labels: expected a JAX array, got builtins.list"):
        pdj.centernet_targets(boxes, [[0]], 3, 8)


def test_targets_bad_labels_raise_value_error_eagerly_and_are_skipped_under_jit():
    """An eager call checks the values as the array API does; under jit they are not known when
    the call is traced, and an object with a bad label is not drawn."""
    bad = LABELS.copy()
    bad[1, 0] = 3  # outside [-1, 3)
    boxes, labels = jnp.asarray(BOXES), jnp.asarray(bad)
    with pytest.raises(ValueError, match=r"labels / boxes: object \[1, 0\] has label 3 .* expected a label in \[-1, 3\)"):
        pdj.centernet_targets(boxes, labels, 3, 8)
    jitted = jax.jit(lambda b, l: pdj.centernet_targets(b, l, 3, 8))(boxes, labels)
    skipped = LABELS.copy()
    skipped[1, 0] = -1
    expected = pydeform.centernet_targets(BOXES, skipped, 3, 8)
    for name, value in expected._asdict().items():
        np.testing.assert_array_equal(np.asarray(getattr(jitted, name)), value, err_msg=name)
