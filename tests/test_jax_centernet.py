"""pydeform.jax's CenterNet functions on JAX CPU arrays: centernet_decode (no gradient) and the
differentiable centernet_focal_loss, eagerly, under jit, grad under jit, vmap and check_grads,
against the NumPy API."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pydeform  # noqa: E402
import pydeform.jax as pdj  # noqa: E402

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(21)
HEAT = rng.uniform(0, 1, (2, 3, 9, 8))
WH = rng.uniform(1, 6, (2, 6, 9, 8))
REG = rng.uniform(0, 1, (2, 2, 9, 8))
# Predictions inside the clamp (1e-4, 1 - 1e-4), where the loss is smooth; a few exact positives.
PRED = rng.uniform(0.05, 0.95, (2, 3, 9, 8))
TARGET = np.where(rng.uniform(size=PRED.shape) > 0.95, 1.0, rng.uniform(0, 0.9, PRED.shape))


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


def test_cpu_centernet_scratch_is_planned_and_served_by_xla(monkeypatch):
    """On the CPU the kernel set publishes its decode / focal-loss plans, so the callbacks run
    with the strict provided-buffer block (an unplanned scratch request would raise)."""
    planned = []
    original = pdj._callback.__wrapped__

    def spy(run, names, backend, is_planned):
        planned.append(is_planned)
        return original(run, names, backend, is_planned)

    monkeypatch.setattr(pdj, "_callback", spy)
    heat, wh, pred, target = (jnp.asarray(a) for a in (HEAT, WH[:, :2], PRED, TARGET))
    np.testing.assert_array_equal(np.asarray(pdj.centernet_decode(heat, wh, K=6)),
                                  pydeform.centernet_decode(HEAT, WH[:, :2], K=6))
    jax.grad(pdj.centernet_focal_loss)(pred, target)
    assert planned == [True, True, True]
