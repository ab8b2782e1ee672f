"""The float64 semi-convolutional reference: every gradient against central finite differences
(inputs drawn away from the norm's kink), the invariants of docs/semiconv.md, and the voting ops
against independent formulations (np.add.at, a brute-force argmin)."""

import numpy as np
import pytest

from reference import semiconv as ref

EPS = 1e-6


def numeric_gradient(f, x):
    """Central differences of the scalar f at array x (x restored afterwards)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + EPS
        up = f()
        x[i] = saved - EPS
        down = f()
        x[i] = saved
        grad[i] = (up - down) / (2 * EPS)
    return grad


def labelled_case(seed, n=2, d=3, h=4, w=5, K=3):
    rng = np.random.default_rng(seed)
    psi = rng.normal(size=(n, d, h, w))
    labels = rng.integers(0, K + 1, size=(n, h, w))
    labels[0, 0, 0] = K  # instance K is never empty; instance 2 may be
    return psi, labels, K


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("coordinates", [False, True])
def test_instance_mean_loss_gradient(reduction, coordinates):
    psi, labels, K = labelled_case(0)
    rng = np.random.default_rng(1)
    g = rng.normal(size=(2, K)) if reduction == "none" else 0.7
    options = dict(coordinates=coordinates, spacing=(0.5, 2.0))

    def f():
        return float((np.asarray(g) * ref.instance_mean_loss(psi, labels, K, reduction, **options)).sum())

    expected = numeric_gradient(f, psi)
    got = ref.instance_mean_loss_backward(g, psi, labels, K, reduction, **options)
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_instance_mean_loss_is_zero_for_constant_instances_and_shift_invariant():
    psi, labels, K = labelled_case(2)
    constant = np.zeros_like(psi)
    for k in range(K + 1):
        constant += (labels == k)[:, None] * np.arange(1.0, 4.0)[None, :, None, None] * (k + 1)
    assert np.all(ref.instance_mean_loss(constant, labels, K, "none") == 0)
    shift = np.array([3.0, -2.0, 0.5])[None, :, None, None]
    np.testing.assert_allclose(ref.instance_mean_loss(psi + shift, labels, K, "none"),
                               ref.instance_mean_loss(psi, labels, K, "none"), atol=1e-12)
    np.testing.assert_allclose(ref.instance_mean_loss_backward(1.0, psi + shift, labels, K),
                               ref.instance_mean_loss_backward(1.0, psi, labels, K), atol=1e-12)


def test_instance_means_and_reductions():
    psi, labels, K = labelled_case(3)
    labels[1] = np.where(labels[1] == 2, 0, labels[1])  # instance 2 of image 1 is empty
    means, counts = ref.instance_means(psi, labels, K)
    assert counts[1, 1] == 0 and np.all(means[1, 1] == 0)
    inside = labels[0] == 1
    np.testing.assert_allclose(means[0, 0], psi[0][:, inside].mean(axis=1))
    losses = ref.instance_mean_loss(psi, labels, K, "none")
    assert ref.instance_mean_loss(psi, labels, K, "sum") == pytest.approx(losses.sum())
    assert ref.instance_mean_loss(psi, labels, K, "mean") == pytest.approx(losses.sum() / (counts > 0).sum())


def test_semiconv_embed_adds_scaled_coordinates():
    phi = np.zeros((1, 3, 2, 3))
    psi = ref.semiconv_embed(phi, (2.0, 0.5))
    np.testing.assert_array_equal(psi[0, 0], [[0, 0, 0], [2, 2, 2]])
    np.testing.assert_array_equal(psi[0, 1], [[0, 0.5, 1], [0, 0.5, 1]])
    assert np.all(psi[0, 2] == 0)


@pytest.mark.parametrize("kernel", ref.KERNELS)
@pytest.mark.parametrize("sigma_kind", ["number", "array"])
def test_affinity_gradients(kernel, sigma_kind):
    rng = np.random.default_rng(4)
    psi = rng.normal(size=(2, 3, 3, 4))
    centers = rng.normal(size=(2, 2, 3))
    sigma = 0.8 if sigma_kind == "number" else rng.uniform(0.5, 2.0, size=(2, 2))
    g = rng.normal(size=(2, 2, 3, 4))
    sigma_box = np.array(sigma, dtype=np.float64)

    def f():
        return float((g * ref.affinity(psi, centers, sigma_box, kernel, coordinates=True)).sum())

    grad_psi, grad_centers, grad_sigma = ref.affinity_backward(g, psi, centers, sigma_box, kernel,
                                                               coordinates=True)
    np.testing.assert_allclose(grad_psi, numeric_gradient(f, psi), atol=1e-7)
    np.testing.assert_allclose(grad_centers, numeric_gradient(f, centers), atol=1e-7)
    np.testing.assert_allclose(grad_sigma, numeric_gradient(f, sigma_box.reshape(np.shape(sigma))), atol=1e-7)


@pytest.mark.parametrize("kernel", ref.KERNELS)
def test_affinity_is_one_at_the_centre(kernel):
    rng = np.random.default_rng(5)
    psi = rng.normal(size=(1, 2, 3, 3))
    centers = psi[:, :, 1, 2][:, None, :]
    values = ref.affinity(psi, centers, 0.3, kernel)
    assert values[0, 0, 1, 2] == 1.0
    assert np.all(values < 1 + 1e-15) and np.all(values > 0)


@pytest.mark.parametrize("mode", ref.SEED_MODES)
@pytest.mark.parametrize("sigma_kind", ["number", "array"])
def test_seeded_mask_logits_gradients(mode, sigma_kind):
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(2, 3, 3))
    psi = rng.normal(size=(2, 3, 3, 3))
    sigma = 1.3 if sigma_kind == "number" else rng.uniform(0.5, 2.0, size=2)
    sigma_box = np.array(sigma, dtype=np.float64)
    g = rng.normal(size=(2, 3, 3))

    def f():
        return float((g * ref.seeded_mask_logits(scores, psi, sigma_box, mode, coordinates=True)).sum())

    grads = ref.seeded_mask_logits_backward(g, scores, psi, sigma_box, mode, coordinates=True)
    # argmax: the seed pixel's own logit sits on the norm's kink (distance 0); its gradient is
    # the documented 0 there, which finite differences cannot see, so that pixel is left out.
    seed = np.argmax(scores.reshape(2, -1), axis=1)
    keep = np.ones(scores.shape, bool)
    if mode == "argmax":
        keep.reshape(2, -1)[np.arange(2), seed] = False
        g[~keep] = 0.0
        grads = ref.seeded_mask_logits_backward(g, scores, psi, sigma_box, mode, coordinates=True)
    np.testing.assert_allclose(grads[0], numeric_gradient(f, scores), atol=1e-7)
    np.testing.assert_allclose(grads[1], numeric_gradient(f, psi), atol=1e-7)
    np.testing.assert_allclose(grads[2], numeric_gradient(f, sigma_box.reshape(np.shape(sigma))), atol=1e-7)


def test_seeded_mask_logits_seed_and_shift():
    scores = np.array([[[0.0, 2.0], [2.0, 1.0]]])  # tie: the lowest flat index (0, 1) wins
    psi = np.arange(8.0).reshape(1, 2, 2, 2)
    out = ref.seeded_mask_logits(scores, psi, 2.0)
    assert out[0, 0, 1] == scores[0, 0, 1]
    np.testing.assert_allclose(out, ref.seeded_mask_logits(scores, psi + 5.0, 2.0), atol=1e-12)
    soft = ref.seeded_mask_logits(scores, psi, 2.0, "softmax")
    np.testing.assert_allclose(soft, ref.seeded_mask_logits(scores + 3.0, psi + 5.0, 2.0, "softmax") - 3.0,
                               atol=1e-12)


def test_hough_votes_equal_add_at():
    rng = np.random.default_rng(7)
    psi = rng.uniform(-2, 9, size=(2, 2, 5, 6))
    psi[0, 0, 0, 0] = 2.5  # half away from zero: row 3
    psi[0, 1, 0, 0] = -0.5  # rounds to -1: outside
    psi[1, 0, 2, 2] = np.nan
    foreground = rng.random((2, 5, 6)) < 0.8
    foreground[:, 0, 0] = foreground[1, 2, 2] = True
    votes = ref.hough_votes(psi, foreground, (7, 8))
    expected = np.zeros((2, 7, 8), np.int32)
    for b, y, x in zip(*np.nonzero(foreground)):
        vy, vx = psi[b, 0, y, x], psi[b, 1, y, x]
        if np.isnan(vy) or np.isnan(vx):
            continue
        ry = int(np.floor(vy + 0.5)) if vy >= 0 else -int(np.floor(-vy + 0.5))
        rx = int(np.floor(vx + 0.5)) if vx >= 0 else -int(np.floor(-vx + 0.5))
        if 0 <= ry < 7 and 0 <= rx < 8:
            np.add.at(expected, (b, ry, rx), 1)
    np.testing.assert_array_equal(votes, expected)
    assert votes.dtype == np.int32


def test_assign_to_centers_is_the_brute_force_argmin():
    rng = np.random.default_rng(8)
    psi = rng.normal(size=(2, 3, 4, 4))
    centers = rng.normal(size=(2, 3, 3))
    centers[1, 0] = centers[1, 2]  # a tie: the lower k wins
    centers[0, 1, 0] = np.nan  # never chosen
    foreground = rng.random((2, 4, 4)) < 0.7
    labels = ref.assign_to_centers(psi, foreground, centers)
    dist = np.sqrt(((psi[:, None] - centers[:, :, :, None, None]) ** 2).sum(axis=2))
    dist = np.where(np.isnan(dist), np.inf, dist)
    expected = np.where(foreground, np.argmin(dist, axis=1) + 1, 0)
    np.testing.assert_array_equal(labels, expected)
    assert not np.any(labels[0] == 2)
    near = ref.assign_to_centers(psi, foreground, centers, max_distance=1.0)
    np.testing.assert_array_equal(near, np.where(dist.min(axis=1) <= 1.0, expected, 0))
