"""Every semi-convolutional op, through the public API, against the float64 reference on small
random cases: shared by the GPU kernel sets' CPU-side twins (the host shim, the Numba CUDA
simulator) and the gpu-marked tests, which run them with the ops patched to their kernel set
(:func:`ops_running`)."""

from unittest import mock

import numpy as np

import pydeform
from pydeform import semiconv as semiconv_module
from reference import semiconv as ref

TOLERANCE = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10}


def ops_running(kernels):
    """The public semi-convolutional ops, for NumPy arrays, run ``kernels``."""
    return mock.patch.object(semiconv_module, "semiconv_kernels", lambda library, backend: kernels)


def assert_close(got, expected, dtype, name, to_host=np.asarray):
    got, expected = np.asarray(to_host(got), np.float64), np.asarray(expected)
    scale = max(1.0, float(np.nanmax(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[np.dtype(dtype)] * scale, err_msg=name)


def embedding_case(rng, dtype, n=2, dims=3, height=5, width=6, K=3):
    psi = rng.normal(size=(n, dims, height, width)).astype(dtype)
    labels = rng.integers(0, K + 1, size=(n, height, width))
    labels[0, 0, 0] = 1  # a one-pixel instance at least: its norm is 0 (the kink)
    labels[0][labels[0] == K] = 0  # an empty instance
    return psi, labels, K


def check_all_ops(rng, dtype, xp=np, to_host=np.asarray):
    """Every op with and without coordinates; ``xp`` makes the input arrays (NumPy or CuPy)."""
    for options in (dict(), dict(coordinates=True, spacing=(0.5, 2.0))):
        psi, labels, K = embedding_case(rng, dtype)
        n, dims, height, width = psi.shape
        d_psi, d_labels = xp.asarray(psi), xp.asarray(labels.astype(np.int32))

        means, counts = pydeform.instance_means(d_psi, d_labels, K, **options)
        ref_means, ref_counts = ref.instance_means(psi, labels, K, **options)
        assert_close(means, ref_means, dtype, "means", to_host)
        np.testing.assert_array_equal(to_host(counts), ref_counts)
        for reduction in ("none", "mean"):
            loss = pydeform.instance_mean_loss(d_psi, d_labels, K, reduction, **options)
            assert_close(loss, ref.instance_mean_loss(psi, labels, K, reduction, **options), dtype, "loss", to_host)
            g = rng.normal(size=(n, K)).astype(dtype) if reduction == "none" else 0.5
            grad = pydeform.instance_mean_loss_backward(xp.asarray(g) if reduction == "none" else g, d_psi, d_labels,
                                                        K, reduction, **options)
            assert_close(grad, ref.instance_mean_loss_backward(g, psi, labels, K, reduction, **options), dtype,
                         "loss grad", to_host)

        centers = rng.normal(size=(n, K, dims)).astype(dtype)
        centers[0, 0] = ref.semiconv_embed(psi, options.get("spacing", 1.0))[0, :, 0, 0] if options else psi[0, :, 0, 0]
        for kernel, sigma in (("laplacian", 0.7), ("gaussian", rng.uniform(0.3, 2.0, size=(n, K)).astype(dtype))):
            d_sigma = sigma if np.isscalar(sigma) else xp.asarray(sigma)
            out = pydeform.affinity(d_psi, xp.asarray(centers), d_sigma, kernel, **options)
            assert_close(out, ref.affinity(psi, centers, sigma, kernel, **options), dtype, kernel, to_host)
            g = rng.normal(size=(n, K, height, width)).astype(dtype)
            got = pydeform.affinity_backward(xp.asarray(g), d_psi, xp.asarray(centers), d_sigma, kernel, **options)
            expected = ref.affinity_backward(g, psi, centers, sigma, kernel, **options)
            for name, a, b in zip(got._fields, got, expected):
                assert_close(a, b, dtype, f"{kernel} {name}", to_host)

        scores = rng.normal(size=(n, height, width)).astype(dtype)
        scores.reshape(n, -1)[:, -1] = scores.reshape(n, -1).max(axis=1)  # a tie: the first wins
        for mode, sigma in (("argmax", 1.3), ("softmax", rng.uniform(0.3, 2.0, size=n).astype(dtype))):
            d_sigma = sigma if np.isscalar(sigma) else xp.asarray(sigma)
            out = pydeform.seeded_mask_logits(xp.asarray(scores), d_psi, d_sigma, mode, **options)
            assert_close(out, ref.seeded_mask_logits(scores, psi, sigma, mode, **options), dtype, mode, to_host)
            g = rng.normal(size=scores.shape).astype(dtype)
            got = pydeform.seeded_mask_logits_backward(xp.asarray(g), xp.asarray(scores), d_psi, d_sigma, mode,
                                                       **options)
            expected = ref.seeded_mask_logits_backward(g, scores, psi, sigma, mode, **options)
            for name, a, b in zip(got._fields, got, expected):
                assert_close(a, b, dtype, f"{mode} {name}", to_host)

        votes_psi = (psi * 3 + 2).astype(dtype)
        votes_psi.reshape(-1)[::5] = np.round(votes_psi.reshape(-1)[::5]) + 0.5  # exact halves: away from zero
        foreground = rng.random((n, height, width)) < 0.7
        for shape in (None, (3, 4)):
            votes = pydeform.hough_votes(xp.asarray(votes_psi), xp.asarray(foreground), shape, **options)
            np.testing.assert_array_equal(to_host(votes), ref.hough_votes(votes_psi, foreground, shape, **options))
        centers[:, -1] = centers[:, 0]  # a tie: the lower k
        for max_distance in (np.inf, 2.0):
            labels_out = pydeform.assign_to_centers(xp.asarray(votes_psi), xp.asarray(foreground),
                                                    xp.asarray(centers * 3), max_distance, **options)
            np.testing.assert_array_equal(to_host(labels_out), ref.assign_to_centers(
                votes_psi, foreground, centers * 3, max_distance, **options))
