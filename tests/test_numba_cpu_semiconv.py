"""The Numba CPU semi-convolutional ops against the float64 reference (hypothesis-drawn shapes,
labels, centers, sigma and options, float32 and float64), their determinism (bit-identical
runs, for 1 and 2 threads), NaN propagation and untouched inputs (the invariants and the voting
ops recovering ground-truth labels from an ideal displacement field: test_semiconv_invariants.py)."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from reference import semiconv as ref

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
TOLERANCE = {np.float32: 2e-4, np.float64: 1e-10}


def assert_close(got, expected, dtype, name):
    expected = np.asarray(expected)
    scale = max(1.0, float(np.nanmax(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=TOLERANCE[dtype] * scale,
                               err_msg=name)
    assert np.asarray(got).dtype == dtype, name


@st.composite
def embedding_cases(draw, dtype):
    """(psi, labels, K, options): psi [N, D, H, W] of dtype, labels in [0, K] of a drawn integer
    dtype, options with or without coordinates (D >= 2) and a drawn spacing."""
    n, dims = draw(st.integers(1, 2)), draw(st.integers(2, 4))
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    K = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    psi = rng.normal(size=(n, dims, height, width)).astype(dtype)
    labels = rng.integers(0, K + 1, size=(n, height, width)).astype(draw(st.sampled_from([np.int32, np.int64])))
    coordinates = draw(st.booleans())
    spacing = draw(st.sampled_from([1.0, 0.5, (2.0, 0.25)]))
    return psi, labels, K, dict(coordinates=coordinates, spacing=spacing), rng


@DTYPES
@settings(max_examples=20)
@given(data=st.data(), reduction=st.sampled_from(["none", "sum", "mean"]))
def test_instance_mean_loss_matches_reference(dtype, data, reduction):
    psi, labels, K, options, rng = data.draw(embedding_cases(dtype))
    before = psi.copy(), labels.copy()
    means, counts = pydeform.instance_means(psi, labels, K, **options)
    ref_means, ref_counts = ref.instance_means(psi, labels, K, **options)
    assert_close(means, ref_means, dtype, "means")
    np.testing.assert_array_equal(counts, ref_counts)
    loss = pydeform.instance_mean_loss(psi, labels, K, reduction, **options)
    assert_close(loss, ref.instance_mean_loss(psi, labels, K, reduction, **options), dtype, "loss")
    g = rng.normal(size=(psi.shape[0], K)).astype(dtype) if reduction == "none" else 0.5
    grad = pydeform.instance_mean_loss_backward(g, psi, labels, K, reduction, **options)
    assert_close(grad, ref.instance_mean_loss_backward(g, psi, labels, K, reduction, **options), dtype, "grad")
    # The forward's saved statistics give the backward bit for bit, without its two passes.
    saved_loss, statistics = pydeform.instance_mean_loss(psi, labels, K, reduction, return_statistics=True, **options)
    assert saved_loss.tobytes() == loss.tobytes()
    np.testing.assert_array_equal(statistics.counts, ref_counts)
    saved = pydeform.instance_mean_loss_backward(g, psi, labels, K, reduction, statistics=statistics, **options)
    assert saved.tobytes() == grad.tobytes()
    np.testing.assert_array_equal(psi, before[0])
    np.testing.assert_array_equal(labels, before[1])


@DTYPES
def test_instance_mean_loss_long_runs_match_reference(dtype):
    """Rows cut into runs of up to ~40 pixels of one label (the kernels' SIMD loops over a run
    and their remainders), coordinates added on the fly; a NaN reaches its instance only."""
    rng = np.random.default_rng(3)
    n, dims, height, width, K = 2, 3, 4, 67, 4
    psi = rng.normal(size=(n, dims, height, width)).astype(dtype)
    cuts = rng.random((n, height, width)) < 0.08
    starts = np.maximum.accumulate(np.where(cuts, np.arange(width), 0), axis=-1)
    labels = np.take_along_axis(rng.integers(0, K + 1, size=(n, height, width)), starts, axis=-1)
    options = dict(coordinates=True, spacing=(0.5, 2.0))
    assert_close(pydeform.instance_means(psi, labels, K, **options).means,
                 ref.instance_means(psi, labels, K, **options)[0], dtype, "means")
    losses = pydeform.instance_mean_loss(psi, labels, K, "none", **options)
    assert_close(losses, ref.instance_mean_loss(psi, labels, K, "none", **options), dtype, "loss")
    g = rng.normal(size=(n, K)).astype(dtype)
    assert_close(pydeform.instance_mean_loss_backward(g, psi, labels, K, "none", **options),
                 ref.instance_mean_loss_backward(g, psi, labels, K, "none", **options), dtype, "grad")
    psi[1, 1, 2, 30] = np.nan  # in a run of instance labels[1, 2, 30] = 1
    nan = np.isnan(pydeform.instance_mean_loss(psi, labels, K, "none", **options))
    assert nan[1, 0] and nan.sum() == 1
    np.testing.assert_array_equal(pydeform.instance_mean_loss(psi, labels, K, "none", **options)[~nan], losses[~nan])


@DTYPES
@settings(max_examples=15)
@given(data=st.data(), kernel=st.sampled_from(["laplacian", "gaussian"]), scalar_sigma=st.booleans())
def test_affinity_matches_reference(dtype, data, kernel, scalar_sigma):
    psi, _, K, options, rng = data.draw(embedding_cases(dtype))
    n, dims, height, width = psi.shape
    centers = rng.normal(size=(n, K, dims)).astype(dtype)
    if psi.size:  # one center on a pixel: affinity 1 and the laplacian's kink
        centers[0, 0] = ref.semiconv_embed(psi, options["spacing"])[0, :, 0, 0] if options["coordinates"] else psi[0, :, 0, 0]
    sigma = 0.7 if scalar_sigma else rng.uniform(0.3, 2.0, size=(n, K)).astype(dtype)
    before = psi.copy(), centers.copy()
    out = pydeform.affinity(psi, centers, sigma, kernel, **options)
    assert_close(out, ref.affinity(psi, centers, sigma, kernel, **options), dtype, "affinity")
    g = rng.normal(size=out.shape).astype(dtype)
    got = pydeform.affinity_backward(g, psi, centers, sigma, kernel, **options)
    expected = ref.affinity_backward(g, psi, centers, sigma, kernel, **options)
    for name, a, b in zip(got._fields, got, expected):
        assert_close(a, b, dtype, name)
    assert got.grad_sigma.shape == np.shape(sigma)
    np.testing.assert_array_equal(psi, before[0])
    np.testing.assert_array_equal(centers, before[1])


@DTYPES
@settings(max_examples=15)
@given(data=st.data(), mode=st.sampled_from(["argmax", "softmax"]), scalar_sigma=st.booleans())
def test_seeded_mask_logits_matches_reference(dtype, data, mode, scalar_sigma):
    psi, _, _, options, rng = data.draw(embedding_cases(dtype))
    regions, _, height, width = psi.shape
    scores = rng.normal(size=(regions, height, width)).astype(dtype)
    if height * width > 1:
        scores.reshape(regions, -1)[:, -1] = scores.reshape(regions, -1).max(axis=1)  # a tie: the first wins
    sigma = 1.3 if scalar_sigma else rng.uniform(0.3, 2.0, size=regions).astype(dtype)
    out = pydeform.seeded_mask_logits(scores, psi, sigma, mode, **options)
    assert_close(out, ref.seeded_mask_logits(scores, psi, sigma, mode, **options), dtype, "logits")
    g = rng.normal(size=scores.shape).astype(dtype)
    got = pydeform.seeded_mask_logits_backward(g, scores, psi, sigma, mode, **options)
    expected = ref.seeded_mask_logits_backward(g, scores, psi, sigma, mode, **options)
    for name, a, b in zip(got._fields, got, expected):
        assert_close(a, b, dtype, name)


@DTYPES
@settings(max_examples=15)
@given(data=st.data(), shape=st.sampled_from([None, (3, 4), (7, 2)]))
def test_voting_ops_match_reference(dtype, data, shape):
    psi, _, K, options, rng = data.draw(embedding_cases(dtype))
    n, dims, height, width = psi.shape
    psi = (psi * 3 + 2).astype(dtype)
    psi.reshape(-1)[:: 5] = np.round(psi.reshape(-1)[:: 5]) + 0.5  # exact halves: away from zero
    foreground = rng.random((n, height, width)) < 0.7
    votes = pydeform.hough_votes(psi, foreground, shape, **options)
    np.testing.assert_array_equal(votes, ref.hough_votes(psi, foreground, shape, **options))
    centers = rng.normal(size=(n, K, dims)).astype(dtype) * 3
    centers[:, -1] = centers[:, 0]  # a tie: the lower k
    for max_distance in (np.inf, 2.0):
        labels = pydeform.assign_to_centers(psi, foreground, centers, max_distance, **options)
        np.testing.assert_array_equal(labels, ref.assign_to_centers(psi, foreground, centers, max_distance,
                                                                    **options))


def test_semiconv_embed_matches_reference():
    phi = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    before = phi.copy()
    psi = pydeform.semiconv_embed(phi, (0.5, 2.0))
    np.testing.assert_allclose(psi, ref.semiconv_embed(phi, (0.5, 2.0)), atol=1e-6)
    assert psi.dtype == np.float32
    np.testing.assert_array_equal(phi, before)
    np.testing.assert_array_equal(pydeform.instance_mean_loss(psi, np.ones((2, 4, 5), np.int32), 1),
                                  pydeform.instance_mean_loss(phi, np.ones((2, 4, 5), np.int32), 1, coordinates=True,
                                                              spacing=(0.5, 2.0)))


def test_reductions_are_bit_identical_across_runs_and_thread_counts():
    rng = np.random.default_rng(1)
    psi = rng.normal(size=(4, 5, 40, 33)).astype(np.float32)
    labels = rng.integers(0, 7, size=(4, 40, 33))
    runs = np.repeat(labels[:, :, :3], 11, axis=2)  # runs of 11 and more: the SIMD loops' sums
    centers = rng.normal(size=(4, 6, 5)).astype(np.float32)

    def run():
        return [pydeform.instance_means(psi, labels, 6).means,
                pydeform.instance_mean_loss(psi, labels, 6, "none"),
                pydeform.instance_mean_loss_backward(1.0, psi, labels, 6, coordinates=True),
                pydeform.instance_mean_loss(psi, runs, 6, "none"),
                pydeform.instance_mean_loss_backward(1.0, psi, runs, 6, coordinates=True),
                *pydeform.affinity_backward(np.ones((4, 6, 40, 33), np.float32), psi, centers, 0.9)]

    first = run()
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run()
    finally:
        numba.set_num_threads(previous)
    for a, b, c in zip(first, run(), single):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_nan_propagates_to_its_instance_only():
    psi = np.zeros((1, 2, 2, 3))
    psi[0, 0, 0, 0] = np.nan
    labels = np.array([[[1, 1, 2], [2, 0, 0]]])
    losses = pydeform.instance_mean_loss(psi, labels, 2, "none")
    assert np.isnan(losses[0, 0]) and losses[0, 1] == 0
    grad = pydeform.instance_mean_loss_backward(np.ones((1, 2)), psi, labels, 2, "none")
    assert np.isnan(grad[0, :, 0, :2]).all() and not np.isnan(grad[0, :, 1]).any()


def test_loss_is_zero_for_constant_instances_with_coordinates():
    """phi = (k-specific point) - coordinates makes psi constant per instance: loss and
    gradient 0, the embedding the semi-convolutional operator lets a network learn."""
    height, width = 6, 7
    labels = np.zeros((1, height, width), np.int64)
    labels[0, :3, :4], labels[0, 3:, 2:] = 1, 2
    points = np.array([[0.0, 0.0], [1.5, 3.0], [4.0, 4.5]])
    ys, xs = np.mgrid[:height, :width]
    phi = np.stack([points[labels[0], 0] - ys, points[labels[0], 1] - xs])[None]
    assert pydeform.instance_mean_loss(phi, labels, 2, coordinates=True) == 0
    assert not pydeform.instance_mean_loss_backward(1.0, phi, labels, 2, coordinates=True).any()
