"""The semi-convolutional ops' selftest checks (docs/semiconv.md), each against an answer NumPy
computes directly: the embedding adds the pixel coordinates, the instance means and the
instance mean loss are per-label means and mean distances, the affinities and the seeded mask
logits their formulas, the votes ``np.add.at`` of the rounded positions, the assignment a
brute-force argmin, the peaks of planted vote maps their cells; the loss and its gradient are
bit-identical run to run; the generic checks of every gradient.

The ops are looked up in this module when a check runs (the test suite puts its float64
reference in their place to check the checks).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..semiconv import (  # noqa: F401 (some looked up by name only, see _public)
    affinity, affinity_backward, assign_to_centers, hough_peaks, hough_votes, instance_mean_loss,
    instance_mean_loss_backward, instance_means, seeded_mask_logits, seeded_mask_logits_backward, semiconv_embed,
)
from .common import (
    OUTPUT_TOLERANCE, OpCalls, cases_of, check, forward_check, register_common_checks, rounded, run_backward,
    run_forward,
)

EXACT = dict.fromkeys(OUTPUT_TOLERANCE, 0.0)


def _public(name):
    """The op ``name`` of this module, looked up when called (as the checks' calls of the ops are)."""
    return lambda *arguments, **options: globals()[name](*arguments, **options)


def embedded(psi, case) -> np.ndarray:
    """psi with the pixel coordinates added when the case has ``coordinates=True``."""
    if not case.coordinates:
        return psi
    sy, sx = case.spacing
    psi = psi.copy()
    psi[:, 0] += sy * np.arange(psi.shape[2])[:, None]
    psi[:, 1] += sx * np.arange(psi.shape[3])[None, :]
    return psi


def _coordinate_options(case) -> dict:
    return dict(coordinates=case.coordinates, spacing=case.spacing)


def _distances(psi, centers) -> np.ndarray:
    """||psi_u - centers[n, k]|| [N, K, H, W]."""
    return np.sqrt(((psi[:, None] - centers[:, :, :, None, None]) ** 2).sum(axis=2))


# --- semiconv_embed --------------------------------------------------------------------------


@check("semiconv_embed", "= phi + (sy * y, sx * x)", OUTPUT_TOLERANCE)
def _embedding_adds_coordinates(backend, dtype, quick):
    phi = rounded({"phi": np.random.default_rng(50).standard_normal((2, 3, 5, 6))}, dtype)["phi"]
    psi = semiconv_embed(backend.to_device(phi, dtype), (0.5, 2.0), backend=backend.option)
    expected = phi.copy()
    expected[:, 0] += 0.5 * np.arange(5)[:, None]
    expected[:, 1] += 2.0 * np.arange(6)[None, :]
    return max(float(np.abs(backend.to_host(psi) - expected).max() / np.abs(expected).max()),
               float(np.abs(backend.to_host(psi)[:, 2] - phi[:, 2]).max()))


# --- instance_means and instance_mean_loss ------------------------------------------------------


class InstanceCase(NamedTuple):
    n: int
    dims: int
    height: int
    width: int
    num_instances: int  # the last one empty: its mean, count and loss are 0
    reduction: str
    coordinates: bool
    spacing: tuple

    def options(self) -> dict:
        return dict(num_instances=self.num_instances, reduction=self.reduction, **_coordinate_options(self))

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.num_instances) if self.reduction == "none" else ()

    def arrays(self, rng) -> dict:
        """psi, and labels 0..K-1 with every instance of 1..K-1 present in every image."""
        labels = rng.integers(0, self.num_instances, (self.n, self.height * self.width))
        labels[:, :self.num_instances - 1] = np.arange(1, self.num_instances)
        labels = np.stack([rng.permutation(row) for row in labels])
        return {"psi": rng.standard_normal((self.n, self.dims, self.height, self.width)),
                "labels": labels.reshape(self.n, self.height, self.width).astype(np.int64)}


INSTANCE_CASES = (
    InstanceCase(2, 3, 5, 6, 4, "mean", True, (0.5, 0.25)),
    InstanceCase(2, 2, 4, 7, 3, "none", False, (1.0, 1.0)),
    InstanceCase(1, 4, 6, 5, 5, "sum", True, (1.0, 1.0)),
)


class PsiGrad(NamedTuple):
    psi: object


def _means_forward(psi, labels, num_instances, reduction, **options):
    return instance_means(psi, labels, num_instances, **options).means


def _loss_backward(grad_output, **arguments):
    return PsiGrad(instance_mean_loss_backward(grad_output, **arguments))


_instance_cases = cases_of(INSTANCE_CASES, InstanceCase.arrays)
INSTANCE_MEANS = OpCalls("instance_means", _means_forward, None, _instance_cases)
INSTANCE_MEAN_LOSS = OpCalls("instance_mean_loss", _public("instance_mean_loss"), _loss_backward, _instance_cases)


def numpy_instance_means(psi, labels, num_instances):
    """(means [N, K, D], counts [N, K]) from one-hot sums (0 for an empty instance)."""
    one_hot = labels[:, None] == np.arange(1, num_instances + 1)[None, :, None, None]  # [N, K, H, W]
    counts = one_hot.sum(axis=(2, 3))
    sums = np.einsum("nkyx,ndyx->nkd", one_hot, psi)
    return sums / np.maximum(counts, 1)[:, :, None], counts


def numpy_instance_mean_loss(psi, labels, num_instances, reduction):
    """The mean distance of each instance's embeddings to their mean, reduced."""
    means, counts = numpy_instance_means(psi, labels, num_instances)
    one_hot = labels[:, None] == np.arange(1, num_instances + 1)[None, :, None, None]
    distances = np.sqrt(((psi[:, None] - means[:, :, :, None, None]) ** 2).sum(axis=2))  # [N, K, H, W]
    losses = (distances * one_hot).sum(axis=(2, 3)) / np.maximum(counts, 1)
    if reduction == "none":
        return losses
    return np.asarray(losses.sum() / (max(int(np.count_nonzero(counts)), 1) if reduction == "mean" else 1))


check("instance_means", "= per-instance mean (NumPy)", OUTPUT_TOLERANCE)(forward_check(
    INSTANCE_MEANS,
    lambda backend, dtype, case, a: numpy_instance_means(embedded(a["psi"], case), a["labels"], case.num_instances)[0],
))


@check("instance_means", "counts = pixels per label", EXACT)
def _counts(backend, dtype, quick):
    errors = []
    for case, arrays, _ in _instance_cases(quick):
        counts = instance_means(backend.to_device(arrays["psi"], dtype), backend.xp.asarray(arrays["labels"]),
                                case.num_instances, backend=backend.option).counts
        _, expected = numpy_instance_means(arrays["psi"], arrays["labels"], case.num_instances)
        errors.append(float(np.abs(backend.to_host(counts) - expected).max()))
    return max(errors)


check("instance_mean_loss", "loss = NumPy formula", OUTPUT_TOLERANCE)(forward_check(
    INSTANCE_MEAN_LOSS,
    lambda backend, dtype, case, a: numpy_instance_mean_loss(embedded(a["psi"], case), a["labels"],
                                                             case.num_instances, case.reduction),
))


@check("instance_mean_loss", "0 for psi constant per instance", OUTPUT_TOLERANCE)
def _zero_loss(backend, dtype, quick):
    """psi (phi plus the coordinates with ``coordinates=True``) a whole-number vector per label:
    exact in every dtype, so the means are too and every distance is 0."""
    errors = []
    for case, arrays, _ in _instance_cases(quick):
        values = np.random.default_rng(51).integers(-4, 5, (case.n, case.num_instances + 1, case.dims))
        constant = np.take_along_axis(values, arrays["labels"].reshape(case.n, -1)[:, :, None], axis=1)
        psi = constant.transpose(0, 2, 1).reshape(case.n, case.dims, case.height, case.width).astype(np.float64)
        phi = psi - (embedded(psi, case) - psi)
        errors.append(float(np.abs(run_forward(INSTANCE_MEAN_LOSS, backend, dtype, case, dict(arrays, psi=phi))).max()))
    return max(errors)


@check("instance_mean_loss", "loss and gradient bit-identical run to run", EXACT)
def _deterministic(backend, dtype, quick):
    case, arrays, grad_output = next(_instance_cases(True))
    arrays = rounded(arrays, dtype)
    runs = [(run_forward(INSTANCE_MEAN_LOSS, backend, dtype, case, arrays),
             run_backward(INSTANCE_MEAN_LOSS, backend, dtype, case, arrays, grad_output)["psi"]) for _ in range(2)]
    same = all(np.array_equal(a, b) for a, b in zip(*runs))
    return 0.0 if same else 1.0


# --- affinity and seeded_mask_logits ------------------------------------------------------------


class AffinityCase(NamedTuple):
    n: int
    dims: int
    height: int
    width: int
    num_centers: int
    kernel: str
    sigma: object  # a number, or None: an array [N, K] among the arguments
    coordinates: bool
    spacing: tuple

    def options(self) -> dict:
        number = {} if self.sigma is None else {"sigma": self.sigma}
        return dict(kernel=self.kernel, **number, **_coordinate_options(self))

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.num_centers, self.height, self.width)

    def arrays(self, rng) -> dict:
        arrays = {"psi": rng.standard_normal((self.n, self.dims, self.height, self.width)),
                  "centers": rng.uniform(-1, 2, (self.n, self.num_centers, self.dims))}
        if self.sigma is None:
            arrays["sigma"] = rng.uniform(0.5, 2.0, (self.n, self.num_centers))
        return arrays


# The first case (the one --quick runs) has every argument with a gradient.
AFFINITY_CASES = (
    AffinityCase(2, 3, 4, 5, 3, "laplacian", None, True, (0.3, 0.2)),
    AffinityCase(2, 2, 5, 4, 2, "gaussian", 0.8, False, (1.0, 1.0)),
    AffinityCase(1, 3, 3, 4, 3, "gaussian", None, False, (1.0, 1.0)),
)


class AffinityGrads(NamedTuple):
    psi: object
    centers: object
    sigma: object


def _affinity_backward(grad_output, **arguments):
    return AffinityGrads(*affinity_backward(grad_output, **arguments))


_affinity_cases = cases_of(AFFINITY_CASES, AffinityCase.arrays)
AFFINITY = OpCalls("affinity", _public("affinity"), _affinity_backward, _affinity_cases)


def numpy_affinity(psi, centers, sigma, kernel):
    sigma = np.broadcast_to(sigma, centers.shape[:2])[:, :, None, None]
    d = _distances(psi, centers)
    return np.exp(-d / sigma) if kernel == "laplacian" else np.exp(-d**2 / (2 * sigma**2))


check("affinity", "= exp(-d / sigma), exp(-d^2 / 2 sigma^2) (NumPy)", OUTPUT_TOLERANCE)(forward_check(
    AFFINITY,
    lambda backend, dtype, case, a: numpy_affinity(embedded(a["psi"], case), a["centers"],
                                                   case.sigma if case.sigma is not None else a["sigma"], case.kernel),
))


class SeededCase(NamedTuple):
    regions: int
    dims: int
    height: int
    width: int
    mode: str
    sigma: object  # a number, or None: an array [R] among the arguments
    coordinates: bool
    spacing: tuple

    def options(self) -> dict:
        number = {} if self.sigma is None else {"sigma": self.sigma}
        return dict(mode=self.mode, **number, **_coordinate_options(self))

    def output_shape(self, arrays) -> tuple:
        return (self.regions, self.height, self.width)

    def arrays(self, rng) -> dict:
        """Scores a random permutation of well-separated values: one clear maximum per region."""
        pixels = self.height * self.width
        scores = np.stack([rng.permutation(pixels) for _ in range(self.regions)]) / pixels
        arrays = {"scores": scores.reshape(self.regions, self.height, self.width),
                  "psi": rng.standard_normal((self.regions, self.dims, self.height, self.width))}
        if self.sigma is None:
            arrays["sigma"] = rng.uniform(0.5, 2.0, self.regions)
        return arrays


SEEDED_CASES = (
    SeededCase(3, 3, 4, 5, "softmax", None, True, (0.25, 0.5)),
    SeededCase(2, 2, 5, 4, "argmax", 1.3, False, (1.0, 1.0)),
    SeededCase(2, 4, 3, 3, "argmax", None, True, (1.0, 1.0)),
)


class SeededGrads(NamedTuple):
    scores: object
    psi: object
    sigma: object


def _seeded_backward(grad_output, **arguments):
    return SeededGrads(*seeded_mask_logits_backward(grad_output, **arguments))


_seeded_cases = cases_of(SEEDED_CASES, SeededCase.arrays)
SEEDED_MASK_LOGITS = OpCalls("seeded_mask_logits", _public("seeded_mask_logits"), _seeded_backward, _seeded_cases)


def numpy_seeded_mask_logits(scores, psi, sigma, mode):
    regions = scores.shape[0]
    flat_scores, flat_psi = scores.reshape(regions, -1), psi.reshape(regions, psi.shape[1], -1)
    if mode == "argmax":
        seeds = flat_psi[np.arange(regions), :, flat_scores.argmax(axis=1)]
    else:
        weights = np.exp(flat_scores - flat_scores.max(axis=1, keepdims=True))
        seeds = (flat_psi * (weights / weights.sum(axis=1, keepdims=True))[:, None]).sum(axis=2)
    d = np.sqrt(((psi - seeds[:, :, None, None]) ** 2).sum(axis=1))
    return scores - d / np.broadcast_to(sigma, (regions,))[:, None, None]


check("seeded_mask_logits", "= scores - ||psi - seed|| / sigma (NumPy)", OUTPUT_TOLERANCE)(forward_check(
    SEEDED_MASK_LOGITS,
    lambda backend, dtype, case, a: numpy_seeded_mask_logits(
        a["scores"], embedded(a["psi"], case), case.sigma if case.sigma is not None else a["sigma"], case.mode),
))


# --- hough_votes, hough_peaks and assign_to_centers -------------------------------------------


class VotingCase(NamedTuple):
    n: int
    dims: int
    height: int
    width: int
    vote_shape: object  # hough_votes' (H', W'), or None
    max_distance: float  # assign_to_centers'
    coordinates: bool
    spacing: tuple

    def options(self) -> dict:
        return dict(vote_shape=self.vote_shape, max_distance=self.max_distance, **_coordinate_options(self))

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.height, self.width)

    def vote_arrays(self, rng) -> dict:
        """psi (with the coordinates) within two pixels and a half of its pixel, some votes
        outside the map, none near a half (a rounding tie); the foreground about 70% of the pixels."""
        shape = (self.n, self.dims, self.height, self.width)
        displacement = rng.integers(-2, 3, shape) + rng.choice([-0.4, -0.2, 0.1, 0.3], shape)
        displacement += rng.uniform(-0.05, 0.05, shape)
        grid = embedded(np.zeros(shape), self._replace(coordinates=True))
        return {"psi": displacement if self.coordinates else displacement + grid,
                "foreground": rng.random((self.n, self.height, self.width)) < 0.7}

    def assign_arrays(self, rng) -> dict:
        """Four centers on a lattice 3 apart; psi (with the coordinates) within 0.4 of a random
        center, or for one pixel in four 0.9 to 1.1 from it: the nearest center is clear, and
        inside or clearly outside a max_distance of 0.6."""
        n, dims, height, width = self.n, self.dims, self.height, self.width
        lattice = np.stack(np.meshgrid(*[np.arange(3)] * dims), -1).reshape(-1, dims)
        centers = np.stack([3.0 * rng.permutation(lattice)[:4] for _ in range(n)])
        nearest = rng.integers(0, 4, (n, height * width, 1))
        direction = rng.standard_normal((n, dims, height, width))
        direction /= np.sqrt((direction**2).sum(axis=1, keepdims=True))
        far = rng.random((n, 1, height, width)) < 0.25
        reach = np.where(far, rng.uniform(0.9, 1.1, far.shape), rng.uniform(0.0, 0.4, far.shape))
        psi = np.take_along_axis(centers, nearest, axis=1).transpose(0, 2, 1).reshape(direction.shape)
        psi = psi + reach * direction
        return {"psi": psi - (embedded(psi, self) - psi), "foreground": rng.random((n, height, width)) < 0.8,
                "centers": centers}


VOTING_CASES = (
    VotingCase(2, 2, 5, 6, None, float("inf"), True, (1.0, 1.0)),
    VotingCase(2, 3, 4, 5, (3, 7), 0.6, False, (1.0, 1.0)),
)


def _votes_forward(psi, foreground, vote_shape, max_distance, **options):
    return hough_votes(psi, foreground, vote_shape, **options)


def _assign_forward(psi, foreground, centers, vote_shape, max_distance, **options):
    return assign_to_centers(psi, foreground, centers, max_distance, **options)


HOUGH_VOTES = OpCalls("hough_votes", _votes_forward, None, cases_of(VOTING_CASES, VotingCase.vote_arrays))
ASSIGN_TO_CENTERS = OpCalls("assign_to_centers", _assign_forward, None,
                            cases_of(VOTING_CASES, VotingCase.assign_arrays))


def numpy_hough_votes(psi, foreground, vote_shape):
    """np.add.at of the rounded (half away from zero) positions of the foreground pixels inside."""
    out_h, out_w = psi.shape[2:] if vote_shape is None else vote_shape
    ys, xs = (np.sign(v) * np.floor(np.abs(v) + 0.5) for v in (psi[:, 0], psi[:, 1]))
    keep = foreground & (ys >= 0) & (ys < out_h) & (xs >= 0) & (xs < out_w)
    votes = np.zeros((psi.shape[0], out_h, out_w), np.int64)
    np.add.at(votes, (np.nonzero(keep)[0], ys[keep].astype(np.int64), xs[keep].astype(np.int64)), 1)
    return votes


def numpy_assign_to_centers(psi, foreground, centers, max_distance):
    """1 + the nearest center by brute force over every (pixel, center) pair; 0 off the
    foreground or beyond max_distance."""
    d = _distances(psi, centers)
    nearest = d.argmin(axis=1)
    return np.where(foreground & (d.min(axis=1) <= max_distance), nearest + 1, 0)


check("hough_votes", "= np.add.at of the rounded positions", EXACT)(forward_check(
    HOUGH_VOTES,
    lambda backend, dtype, case, a: numpy_hough_votes(embedded(a["psi"], case), a["foreground"], case.vote_shape),
))
check("assign_to_centers", "= brute-force argmin", EXACT)(forward_check(
    ASSIGN_TO_CENTERS,
    lambda backend, dtype, case, a: numpy_assign_to_centers(embedded(a["psi"], case), a["foreground"], a["centers"],
                                                            case.max_distance),
))


# Planted peaks: distinct counts of 10 and more on a lattice 3 apart over a background of at most
# 2 votes, so that with min_votes 3 the peaks are the planted cells in decreasing count order and
# the one slot beyond them is empty (NaN center, 0 votes).
PEAK_SHAPE = (2, 8, 10)


@check("hough_peaks", "planted peaks = their cells", EXACT, lambda backend, dtype: dtype == "float32")
def _planted_peaks(backend, dtype, quick):
    rng = np.random.default_rng(52)
    votes = rng.integers(0, 3, PEAK_SHAPE).astype(np.int32)
    sites = [(y, x) for y in range(1, PEAK_SHAPE[1], 3) for x in range(1, PEAK_SHAPE[2], 3)]
    expected_centers = np.full((PEAK_SHAPE[0], len(sites) + 1, 2), np.nan)
    expected_votes = np.zeros((PEAK_SHAPE[0], len(sites) + 1))
    for n in range(PEAK_SHAPE[0]):
        counts = 10 + rng.permutation(len(sites))
        for slot, index in enumerate(np.argsort(-counts)):
            votes[n][sites[index]] = counts[index]
            expected_centers[n, slot], expected_votes[n, slot] = sites[index], counts[index]
    peaks = hough_peaks(backend.xp.asarray(votes), len(sites) + 1, min_votes=3, backend=backend.option)
    centers = backend.to_host(peaks.centers)
    if not np.array_equal(np.isnan(centers), np.isnan(expected_centers)):
        return float("inf")
    found = ~np.isnan(expected_centers)
    return max(float(np.abs(centers[found] - expected_centers[found]).max()),
               float(np.abs(backend.to_host(peaks.votes) - expected_votes).max()))


register_common_checks(INSTANCE_MEANS, ())
register_common_checks(INSTANCE_MEAN_LOSS, ("psi",))
register_common_checks(AFFINITY, ("psi", "centers", "sigma"))
register_common_checks(SEEDED_MASK_LOGITS, ("scores", "psi", "sigma"))
register_common_checks(HOUGH_VOTES, ())
register_common_checks(ASSIGN_TO_CENTERS, ())
