"""pydeform.jax's semi-convolutional functions on JAX CPU arrays: eagerly and under jax.jit equal
to the NumPy API, jax.grad under jit equal to the NumPy backwards, check_grads in float64,
vmap, the voting ops, and argument errors at trace time."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pydeform  # noqa: E402
import pydeform.jax as pdj  # noqa: E402

jax.config.update("jax_enable_x64", True)

RNG = np.random.default_rng(7)
PSI = RNG.normal(size=(2, 3, 4, 5))
LABELS = RNG.integers(0, 4, size=(2, 4, 5)).astype(np.int32)
CENTERS = RNG.normal(size=(2, 3, 3))
SCORES = RNG.normal(size=(2, 4, 5))
SIGMA = RNG.uniform(0.5, 2.0, size=(2, 3))
OPTIONS = dict(coordinates=True, spacing=(0.5, 2.0))

# name: (JAX function of the differentiable arrays, NumPy forward, NumPy gradients given grad_output)
DIFFERENTIABLE = {
    "instance_mean_loss": (
        lambda psi: pdj.instance_mean_loss(psi, jnp.asarray(LABELS), 3, "none", **OPTIONS),
        lambda: pydeform.instance_mean_loss(PSI, LABELS, 3, "none", **OPTIONS),
        lambda g: (pydeform.instance_mean_loss_backward(g, PSI, LABELS, 3, "none", **OPTIONS),),
        (PSI,)),
    "affinity": (
        lambda psi, centers, sigma: pdj.affinity(psi, centers, sigma, "gaussian", **OPTIONS),
        lambda: pydeform.affinity(PSI, CENTERS, SIGMA, "gaussian", **OPTIONS),
        lambda g: tuple(pydeform.affinity_backward(g, PSI, CENTERS, SIGMA, "gaussian", **OPTIONS)),
        (PSI, CENTERS, SIGMA)),
    "affinity-number": (
        lambda psi, centers: pdj.affinity(psi, centers, 0.8),
        lambda: pydeform.affinity(PSI, CENTERS, 0.8),
        lambda g: tuple(pydeform.affinity_backward(g, PSI, CENTERS, 0.8))[:2],
        (PSI, CENTERS)),
    "seeded_mask_logits": (
        lambda scores, psi: pdj.seeded_mask_logits(scores, psi, 0.7, "softmax", **OPTIONS),
        lambda: pydeform.seeded_mask_logits(SCORES, PSI, 0.7, "softmax", **OPTIONS),
        lambda g: tuple(pydeform.seeded_mask_logits_backward(g, SCORES, PSI, 0.7, "softmax", **OPTIONS))[:2],
        (SCORES, PSI)),
    "seeded_mask_logits-sigma": (
        lambda scores, psi, sigma: pdj.seeded_mask_logits(scores, psi, sigma),
        lambda: pydeform.seeded_mask_logits(SCORES, PSI, SIGMA[:, 0]),
        lambda g: tuple(pydeform.seeded_mask_logits_backward(g, SCORES, PSI, SIGMA[:, 0])),
        (SCORES, PSI, SIGMA[:, 0])),
    "semiconv_embed": (
        lambda phi: pdj.semiconv_embed(phi, (0.5, 2.0)),
        lambda: pydeform.semiconv_embed(PSI, (0.5, 2.0)),
        lambda g: (g,),
        (PSI,)),
}


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_eager_jit_and_grad_equal_the_numpy_api(name):
    function, forward, backward, arrays = DIFFERENTIABLE[name]
    values = [jnp.asarray(a) for a in arrays]
    expected = forward()
    np.testing.assert_allclose(np.asarray(function(*values)), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(function)(*values)), expected, rtol=1e-12, atol=1e-12)
    grad_output = np.random.default_rng(1).normal(size=np.shape(expected))
    argnums = tuple(range(len(values)))
    grads = jax.jit(jax.grad(lambda *v: jnp.sum(function(*v) * grad_output), argnums=argnums))(*values)
    for got, want in zip(grads, backward(grad_output)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_check_grads_reverse_mode(name):
    function, _, _, arrays = DIFFERENTIABLE[name]
    check_grads(function, [jnp.asarray(a) for a in arrays], order=1, modes=("rev",), eps=1e-6)


def test_vmap_maps_sequentially():
    loss = jax.vmap(lambda psi, labels: pdj.instance_mean_loss(psi[None], labels[None], 3))
    expected = [pydeform.instance_mean_loss(PSI[i:i + 1], LABELS[i:i + 1], 3) for i in range(2)]
    np.testing.assert_allclose(np.asarray(loss(jnp.asarray(PSI), jnp.asarray(LABELS))), expected, rtol=1e-12)


def test_voting_ops_and_means_equal_the_numpy_api():
    psi, foreground = jnp.asarray(PSI), jnp.asarray(LABELS > 0)
    votes = jax.jit(lambda p, f: pdj.hough_votes(p, f, (6, 7), **OPTIONS))(psi, foreground)
    expected_votes = pydeform.hough_votes(PSI, LABELS > 0, (6, 7), **OPTIONS)
    np.testing.assert_array_equal(np.asarray(votes), expected_votes)
    for got, want in zip(pdj.hough_peaks(votes, 2), pydeform.hough_peaks(expected_votes, 2)):
        np.testing.assert_array_equal(np.asarray(got), want)
    labels = pdj.assign_to_centers(psi, foreground, jnp.asarray(CENTERS), 2.5, **OPTIONS)
    np.testing.assert_array_equal(np.asarray(labels), pydeform.assign_to_centers(PSI, LABELS > 0, CENTERS, 2.5,
                                                                                 **OPTIONS))
    means = pdj.instance_means(psi, jnp.asarray(LABELS), 3)
    for got, want in zip(means, pydeform.instance_means(PSI, LABELS, 3)):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("call, error, words", [
    (lambda: pdj.instance_mean_loss(jnp.asarray(PSI), jnp.asarray(LABELS), 2), ValueError,
     r"labels: expected values in \[0, 2\]"),
    (lambda: jax.jit(lambda p: pdj.instance_mean_loss(p, jnp.asarray(LABELS), 3, "avg"))(jnp.asarray(PSI)),
     ValueError, "reduction: expected one of"),
    (lambda: pdj.affinity(jnp.asarray(PSI), jnp.asarray(CENTERS), 0.0), ValueError, "sigma: expected a number > 0"),
    (lambda: pdj.affinity(jnp.asarray(PSI), jnp.asarray(CENTERS), jnp.ones((2, 2))), ValueError,
     "sigma: expected shape"),
    (lambda: pdj.semiconv_embed(jnp.asarray(PSI[:, :1])), ValueError, "phi: coordinates=True needs D >= 2"),
    (lambda: pdj.hough_votes(jnp.asarray(PSI), jnp.asarray(LABELS)), TypeError, "foreground: expected dtype bool"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()
