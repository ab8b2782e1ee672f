"""Every semi-convolutional op, through the public API, against the float64 reference on small
random cases: shared by the GPU kernel sets' CPU-side twins (the host shim, the Numba CUDA
simulator) and the gpu-marked tests, which run them with the ops patched to their kernel set
(:func:`ops_running`)."""

import decimal
import functools
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
    finite = np.abs(expected[np.isfinite(expected)])  # an infinity would make any tolerance infinite
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[np.dtype(dtype)] * scale, err_msg=name)


def embedding_case(rng, dtype, n=2, dims=3, height=5, width=6, K=3):
    psi = rng.normal(size=(n, dims, height, width)).astype(dtype)
    labels = rng.integers(0, K + 1, size=(n, height, width))
    labels[0, 0, 0] = 1  # a one-pixel instance at least: its norm is 0 (the kink)
    labels[0][labels[0] == K] = 0  # an empty instance
    return psi, labels, K


def check_all_ops(rng, dtype, xp=np, to_host=np.asarray, **sizes):
    """Every op with and without coordinates; ``xp`` makes the input arrays (NumPy or CuPy);
    ``sizes``: embedding_case's n, dims, height, width, K."""
    for options in (dict(), dict(coordinates=True, spacing=(0.5, 2.0))):
        psi, labels, K = embedding_case(rng, dtype, **sizes)
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


def check_invariants(dtype, xp=np, to_host=np.asarray):
    """The invariants of docs/semiconv.md, exactly where the arithmetic is exact (small integer
    embeddings), NaN kept to its instance, two runs bit-identical, and every input unchanged."""
    rng = np.random.default_rng(3)
    _, labels, K = embedding_case(rng, dtype)
    n = labels.shape[0]
    points = rng.integers(-4, 5, size=(n, K + 1, 3)).astype(dtype)
    constant = np.moveaxis(points[np.arange(n)[:, None, None], labels], -1, 1)  # psi constant per instance
    height, width = labels.shape[1:]
    coordinates = np.zeros((3, height, width), dtype)
    coordinates[:2] = np.mgrid[:height, :width] * np.array([2.0, 0.5])[:, None, None]  # spacing (2, 0.5)
    phi = constant - coordinates
    d_labels = xp.asarray(labels)
    inputs = {"labels": (labels, d_labels)}

    def device(name, array):
        inputs[name] = (array, xp.asarray(array))
        return inputs[name][1]

    for name, options in (("constant", {}), ("phi", dict(coordinates=True, spacing=(2.0, 0.5)))):
        d_psi = device(name, constant if name == "constant" else phi)
        loss = pydeform.instance_mean_loss(d_psi, d_labels, K, "none", **options)
        grad = pydeform.instance_mean_loss_backward(1.0, d_psi, d_labels, K, **options)
        assert not to_host(loss).any() and not to_host(grad).any(), f"loss 0 for psi constant per instance ({name})"
        # the pixel (y, x) of each image as every center: affinity exactly 1 there
        pixels = [(1, 2), (3, 4)][:n]
        centers = np.stack([constant[b, :, y, x] for b, (y, x) in enumerate(pixels)])[:, None].repeat(K, axis=1)
        d_centers = device(f"centers {name}", centers)
        for kernel in ("laplacian", "gaussian"):
            values = to_host(pydeform.affinity(d_psi, d_centers, 0.7, kernel, **options))
            assert all(values[b, :, y, x].tolist() == [1.0] * K for b, (y, x) in enumerate(pixels)), kernel

    psi = rng.normal(size=constant.shape).astype(dtype)
    shift = np.array([3.0, -2.0, 0.5], dtype)[None, :, None, None]
    d_psi, d_shifted = device("psi", psi), device("shifted", psi + shift)
    for reduction, g in (("none", xp.asarray(rng.normal(size=(n, K)).astype(dtype))), ("mean", 0.5)):
        for name, f in (("loss", pydeform.instance_mean_loss),
                        ("grad", functools.partial(pydeform.instance_mean_loss_backward, g))):
            assert_close(f(d_shifted, d_labels, K, reduction), to_host(f(d_psi, d_labels, K, reduction)), dtype,
                         f"{name} of psi plus a constant ({reduction})", to_host)

    nan_psi = psi.copy()
    nan_psi[0, 1, 0, 0] = np.nan  # labels[0, 0, 0] = 1
    d_nan = device("nan", nan_psi)
    loss = to_host(pydeform.instance_mean_loss(d_nan, d_labels, K, "none"))
    grad = to_host(pydeform.instance_mean_loss_backward(xp.asarray(np.ones((n, K), dtype)), d_nan, d_labels, K,
                                                        "none"))
    assert np.isnan(loss[0, 0]) and not np.isnan(loss[0, 1:]).any() and not np.isnan(loss[1:]).any()
    assert np.isnan(grad[0][:, labels[0] == 1]).all() and not np.isnan(grad[0][:, labels[0] != 1]).any()

    # NaN scores: the seed is NumPy's argmax (a NaN is the largest score, the first NaN wins); and
    # a region of -inf scores
    nan_scores = rng.normal(size=(4, height, width)).astype(dtype)
    nan_scores[0, 2, 3] = nan_scores[1, 0, 0] = nan_scores[2, 1, 1] = nan_scores[2, 3, 0] = np.nan
    nan_scores[3] = -np.inf
    seeded_psi = rng.normal(size=(4, 3, height, width)).astype(dtype)
    d_scores, d_seeded_psi = device("NaN scores", nan_scores), device("seeded psi", seeded_psi)
    g = rng.normal(size=nan_scores.shape).astype(dtype)
    with np.errstate(invalid="ignore"):
        for mode in ("argmax", "softmax"):
            assert_close(pydeform.seeded_mask_logits(d_scores, d_seeded_psi, 1.3, mode),
                         ref.seeded_mask_logits(nan_scores, seeded_psi, 1.3, mode), dtype, f"NaN scores {mode}",
                         to_host)
            got = pydeform.seeded_mask_logits_backward(xp.asarray(g), d_scores, d_seeded_psi, 1.3, mode)
            expected = ref.seeded_mask_logits_backward(g, nan_scores, seeded_psi, 1.3, mode)
            for name, a, b in zip(got._fields, got, expected):
                assert_close(a, b, dtype, f"NaN scores {mode} {name}", to_host)

    centers = device("centers", rng.normal(size=(n, K, 3)).astype(dtype))
    scores = device("scores", rng.normal(size=labels.shape).astype(dtype))
    grad_affinity = device("grad affinity", rng.normal(size=(n, K, height, width)).astype(dtype))

    def run():
        return [pydeform.instance_means(d_psi, d_labels, K, coordinates=True).means,
                pydeform.instance_mean_loss(d_psi, d_labels, K, "none"),
                pydeform.instance_mean_loss_backward(1.0, d_psi, d_labels, K, coordinates=True),
                *pydeform.affinity_backward(grad_affinity, d_psi, centers, 0.9, "gaussian"),
                *pydeform.seeded_mask_logits_backward(scores, scores, d_psi, 1.1, "softmax")]

    for first, second in zip(run(), run()):
        assert to_host(first).tobytes() == to_host(second).tobytes(), "two runs differ"
    for name, (host, on_device) in inputs.items():
        np.testing.assert_array_equal(to_host(on_device), host, err_msg=f"input {name} changed")


def check_ideal_displacements_recover_labels(xp=np, to_host=np.asarray):
    """Each instance's pixels point at its centre: hough_votes + hough_peaks + assign_to_centers
    give back the ground-truth labels (up to the instances' order), identical copies apart."""
    height, width = 20, 24
    truth = np.zeros((2, height, width), np.int32)
    truth[0, 2:7, 3:9], truth[0, 10:16, 12:20], truth[0, 2:6, 15:22] = 1, 2, 3
    truth[1, 5:12, 4:10], truth[1, 13:19, 2:8] = 1, 2  # identical copies
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    phi = np.zeros((2, 2, height, width), np.float32)
    for b in range(2):
        for k in range(1, truth[b].max() + 1):
            inside = truth[b] == k
            phi[b, 0][inside] = ys[inside].mean() - ys[inside]
            phi[b, 1][inside] = xs[inside].mean() - xs[inside]
    foreground = truth > 0
    d_phi, d_foreground = xp.asarray(phi), xp.asarray(foreground)
    votes = pydeform.hough_votes(d_phi, d_foreground, coordinates=True)
    assert int(to_host(votes).sum()) == foreground.sum()
    peaks = pydeform.hough_peaks(votes, 4, min_votes=2)
    assert (to_host(peaks.votes) > 0).sum(axis=1).tolist() == [3, 2]
    labels = to_host(pydeform.assign_to_centers(d_phi, d_foreground, peaks.centers, 1.0, coordinates=True))
    for b in range(2):
        pairs = {(int(t), int(p)) for t, p in zip(truth[b].ravel(), labels[b].ravel())}
        assert len(pairs) == truth[b].max() + 1 and len({p for _, p in pairs}) == len(pairs)
        assert (0, 0) in pairs
    np.testing.assert_array_equal(to_host(d_phi), phi)
    np.testing.assert_array_equal(to_host(d_foreground), foreground)


def check_votes_round_half_away(dtype, hough_votes=pydeform.hough_votes, xp=np, to_host=np.asarray):
    """The votes of values at and around halves (the float just below 0.5, -0.5, 1.5, 2.5 and
    3.5, the halves themselves and the floats just above) land where an exact decimal rounding,
    ties away from zero, puts them, and NaN and infinite ones nowhere; with and without
    coordinates."""
    below = [np.nextafter(dtype(h), dtype(0)) for h in (0.5, 1.5, 2.5, 3.5)]
    above = [np.nextafter(dtype(h), dtype(9)) for h in (0.5, 1.5, 2.5)]
    values = np.array([*below, *(-v for v in below), 0.5, -0.5, 1.5, 2.5, 3.5, *above, np.nan, np.inf, -np.inf],
                      dtype)
    expected = np.zeros((1, 5, 5), np.int32)
    for column, v in enumerate(values[np.isfinite(values)]):
        row = int(decimal.Decimal(float(v)).quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_UP))
        if 0 <= row < 5:
            expected[0, row, column % 5] += 1
    # rows vote the values, columns 0..4 in turn (exact); with coordinates the columns come from x
    width = len(values)
    psi = np.stack([values, np.arange(width) % 5]).astype(dtype).reshape(1, 2, 1, width)
    phi = psi.copy()
    phi[0, 1] -= np.arange(width, dtype=dtype)  # + x gives the column back exactly
    foreground = np.ones((1, 1, width), bool)
    np.testing.assert_array_equal(to_host(hough_votes(xp.asarray(psi), xp.asarray(foreground), (5, 5))), expected)
    np.testing.assert_array_equal(to_host(hough_votes(xp.asarray(phi), xp.asarray(foreground), (5, 5),
                                                      coordinates=True)), expected)
