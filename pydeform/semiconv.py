"""Semi-convolutional operators for instance segmentation (Novotny et al., ECCV 2018).

Semantics are those of docs/semiconv.md. Embeddings psi ``[N, D, H, W]``; instance labels
``[N, H, W]`` of an integer dtype, 0 = background and 1..K the instances (K =
``num_instances``, static). Every op that reads psi takes phi instead with
``coordinates=True`` and adds the pixel coordinates on the fly (``y * sy`` to channel 0,
``x * sx`` to channel 1, ``spacing = (sy, sx)`` or one number): no coordinate grid is
materialised, and a gradient with respect to psi is then the gradient with respect to phi.

This module checks every argument once and calls the semi-convolutional kernel set
(:func:`pydeform.backends.semiconv_kernels`, methods described in
:class:`pydeform.backends.numba_kernels.semiconv.NumbaCpuSemiConvKernels`). Per-instance sums
are segmented reductions in a fixed order without a one-hot mask or atomics: results are
bit-identical run to run and for every thread count, and the memory beyond the inputs and
outputs is O(N * K * D). NumPy arrays run the Numba CPU kernels, CuPy arrays the CuPy
RawKernels (``backend=None``) or the Numba CUDA kernels (``backend="numba"``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._arrays import (
    array_library,
    check_arrays,
    check_backend,
    check_bool,
    check_finite_float,
    check_int,
    int_pair,
    shape_of,
    values_checked,
)
from ._interop import dlpack_entry
from ._workspace import output, scratch
from .backends import semiconv_kernels
from .centernet import _check_shape, _require, centernet_decode

__all__ = [
    "AffinityGrads",
    "HoughPeaks",
    "InstanceLossStatistics",
    "InstanceMeans",
    "SeededMaskGrads",
    "affinity",
    "affinity_backward",
    "assign_to_centers",
    "check_label_values",
    "hough_peaks",
    "hough_votes",
    "instance_mean_loss",
    "instance_mean_loss_backward",
    "instance_means",
    "seeded_mask_logits",
    "seeded_mask_logits_backward",
    "semiconv_embed",
    "semiconv_workspace",
    "sigma_split",
]

REDUCTIONS = ("none", "sum", "mean")
AFFINITY_KERNELS = ("laplacian", "gaussian")
SEED_MODES = ("argmax", "softmax")


class InstanceMeans(NamedTuple):
    """means [N, K, D] (psi's dtype; 0 for an empty instance), counts int64 [N, K]."""

    means: object
    counts: object


class InstanceLossStatistics(NamedTuple):
    """What :func:`instance_mean_loss` computes on its way and its backward needs (in the
    kernel set's statistics dtype: float64 on the CPU, the accumulation dtype on the GPU):
    means [N, K, D] (0 for an empty instance), counts int64 [N, K] and unit_sums [N, K, D], the
    per-instance sums of the unit vectors ``e_u``."""

    means: object
    counts: object
    unit_sums: object


class AffinityGrads(NamedTuple):
    """Gradients of :func:`affinity`: psi [N, D, H, W], centers [N, K, D], sigma (0-d for a
    number, else [N, K])."""

    grad_psi: object
    grad_centers: object
    grad_sigma: object


class SeededMaskGrads(NamedTuple):
    """Gradients of :func:`seeded_mask_logits`: scores [R, h, w], psi [R, D, h, w], sigma (0-d
    for a number, else [R])."""

    grad_scores: object
    grad_psi: object
    grad_sigma: object


class HoughPeaks(NamedTuple):
    """The peaks of a vote map: centers [N, K, 2] (y, x) float32, NaN for a slot without a peak
    of at least ``min_votes``; votes int32 [N, K], 0 for such a slot."""

    centers: object
    votes: object


def _kernels(library, backend):
    return semiconv_kernels(library, check_backend(backend, library))


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return choices.index(value)


def coordinate_offsets(name, shape, coordinates, spacing):
    """The (cy, cx) float64 [D] factors of the on-the-fly coordinates for an embedding ``name``
    of ``shape`` [N, D, H, W]: (sy, 0, ...) and (0, sx, 0, ...) with ``coordinates``, else
    zeros. Checks D >= 2 with coordinates and the spacing."""
    coordinates = check_bool("coordinates", coordinates)
    sy, sx = _spacing(spacing)
    dims = shape[1]
    cy, cx = np.zeros(dims), np.zeros(dims)
    if coordinates:
        if dims < 2:
            raise ValueError(f"{name}: coordinates=True needs D >= 2 channels (y, x), got shape {tuple(shape)}")
        cy[0], cx[1] = sy, sx
    return cy, cx


def _spacing(spacing):
    items = (spacing, spacing) if isinstance(spacing, numbers.Real) else spacing
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"spacing: expected a number or a pair (sy, sx), got {spacing!r}") from None
    if len(items) != 2:
        raise TypeError(f"spacing: expected a number or a pair (sy, sx), got {spacing!r}")
    return tuple(check_finite_float("spacing", item) for item in items)


def _check_index_array(name, value, library, like, dtype_kinds, expected_shape):
    """An integer (``"iu"``) or bool (``"b"``) array ``name`` beside the float array ``like``."""
    lib = array_library(name, value)
    if lib != library:
        raise TypeError(f"{name}: expected a {library} array like the embeddings, got a {lib} array")
    if library == "cupy" and value.device.id != like.device.id:
        raise ValueError(f"{name}: expected an array on GPU {like.device.id}, got GPU {value.device.id}")
    kind = np.dtype(value.dtype).kind
    if kind not in dtype_kinds:
        what = "an integer dtype" if dtype_kinds == "iu" else "dtype bool"
        raise TypeError(f"{name}: expected {what}, got {np.dtype(value.dtype).name}")
    _check_shape(name, shape_of(value), expected_shape)


def check_label_values(labels, num_instances):
    """Labels must lie in [0, num_instances] (read on the host: a GPU array synchronises). One
    reduction checks them: seen as unsigned integers, negative labels are larger than any K."""
    if labels.size and int(labels.view(f"u{labels.dtype.itemsize}").max()) > num_instances:
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"labels: expected values in [0, {num_instances}] (0 = background, 1..num_instances the "
                         f"instances), got values in [{low}, {high}]")


def _labels(labels, psi, library, num_instances, xp):
    """Check labels [N, H, W] (integer values in [0, num_instances]); return them contiguous."""
    n, _, height, width = shape_of(psi)
    _check_index_array("labels", labels, library, psi, "iu", (n, height, width))
    if values_checked():
        check_label_values(labels, num_instances)
    return xp.ascontiguousarray(labels)


def _foreground(foreground, psi, library, xp):
    n, _, height, width = shape_of(psi)
    _check_index_array("foreground", foreground, library, psi, "b", (n, height, width))
    return xp.ascontiguousarray(foreground)


def _sigma(sigma, psi, shape, kernels):
    """Check sigma (a number > 0, or an array of ``shape`` in psi's dtype with values > 0);
    return (sigma of ``shape`` in the kernels' statistics dtype, whether it was a number)."""
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        value = check_finite_float("sigma", sigma)
        if value <= 0:
            raise ValueError(f"sigma: expected a number > 0, got {sigma!r}")
        return kernels.xp.full(shape, value, dtype=kernels.statistics_dtype(psi.dtype)), True
    _require(sigma=sigma)
    check_arrays({"psi": psi, "sigma": sigma}, ranks={"psi": 4, "sigma": len(shape)})
    _check_shape("sigma", shape_of(sigma), shape)
    if values_checked() and sigma.size and not bool((sigma > 0).all()):
        raise ValueError(f"sigma: expected values > 0, got {float(sigma.reshape(-1)[np.argmin(sigma > 0)])}")
    return kernels.xp.ascontiguousarray(sigma, dtype=kernels.statistics_dtype(psi.dtype)), False


def _embedding(psi, extra):
    """Check the float arrays {name: (array, rank)} sharing psi's library and dtype."""
    _require(psi=psi, **{name: value for name, (value, _) in extra.items()})
    arrays = {"psi": psi, **{name: value for name, (value, _) in extra.items()}}
    ranks = {"psi": 4, **{name: rank for name, (_, rank) in extra.items()}}
    return check_arrays(arrays, ranks=ranks)


def _grad_output(grad_output, like, shape, xp):
    """grad_output as an array of ``like``'s dtype and ``shape`` (a number for a 0-d one)."""
    if isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool) and shape == ():
        return xp.asarray(grad_output, dtype=like.dtype)
    _require(grad_output=grad_output)
    check_arrays({"psi": like, "grad_output": grad_output}, ranks={"psi": like.ndim,
                                                                   "grad_output": getattr(grad_output, "ndim", 0)})
    _check_shape("grad_output", shape_of(grad_output), shape)
    return xp.ascontiguousarray(grad_output)


def semiconv_workspace(kernels, op, shapes, dtype, num_instances=None, reduction="mean", vote_shape=None):
    """What the driver of ``op`` ("instance_means", "instance_mean_loss", "affinity",
    "seeded_mask_logits", "hough_votes" or "assign_to_centers") requests from
    :mod:`pydeform._workspace`, for argument ``shapes`` ({name: shape}; no "sigma" for a number)
    and embeddings of ``dtype``: ``(outputs, forward scratch, backward scratch)``, each {slot:
    (shape, dtype)}. The loss's outputs include its :class:`InstanceLossStatistics`
    (``return_statistics=True``) and its backward takes them; a number sigma's gradient slot is
    planned as backward scratch; ``vote_shape`` is hough_votes' (H', W'), default (H, W). The
    scratch includes the kernel set's own (``kernels.workspace``: the float32 copies of the
    Numba CUDA kernels for half types)."""
    outputs, forward, backward = _driver_plans(kernels, op, shapes, dtype, num_instances, reduction, vote_shape)
    arrays = {**shapes, **{slot: shape for slot, (shape, _) in outputs.items()}}
    return (outputs, {**forward, **kernels.workspace(op, arrays, dtype, backward=False)},
            {**backward, **kernels.workspace(op, arrays, dtype, backward=True)})


def _driver_plans(kernels, op, shapes, dtype, num_instances, reduction, vote_shape):
    """:func:`semiconv_workspace` but the kernel set's own scratch."""
    acc = kernels.statistics_dtype(dtype)
    n, dims, height, width = shapes["psi"]
    if op in ("hough_votes", "assign_to_centers"):
        size = (height, width) if op == "assign_to_centers" or vote_shape is None else tuple(vote_shape)
        return {"output": ((n, *size), np.int32)}, {}, {}
    if op in ("instance_means", "instance_mean_loss"):
        stats = {"semiconv_means": ((n, num_instances, dims), acc), "semiconv_counts": ((n, num_instances), np.int64),
                 "semiconv_norm_sums": ((n, num_instances), acc),
                 "semiconv_unit_sums": ((n, num_instances, dims), acc)}
        if op == "instance_means":
            return {"means": ((n, num_instances, dims), dtype), "counts": ((n, num_instances), np.int64)}, stats, {}
        loss_shape = (n, num_instances) if reduction == "none" else ()
        return ({"output": (loss_shape, dtype), "means": stats["semiconv_means"], "counts": stats["semiconv_counts"],
                 "unit_sums": stats["semiconv_unit_sums"]}, stats, {})
    scalar = {} if "sigma" in shapes else {"grad_sigma": ((), dtype)}
    if op == "affinity":
        k = shapes["centers"][1]
        return ({"output": ((n, k, height, width), dtype)}, {},
                {"semiconv_grad_sigma": ((n, k), acc), **scalar})
    seeds = {"semiconv_seeds": ((n, dims), acc), "semiconv_seed_weights": ((n, height, width), acc)}
    return ({"output": ((n, height, width), dtype)}, seeds,
            {**seeds, "semiconv_grad_seeds": ((n, dims), acc), "semiconv_grad_sigma": ((n,), acc), **scalar})


def sigma_split(function):
    """``function`` (:func:`affinity`, :func:`seeded_mask_logits` or their backwards) taking
    sigma as the pair of the framework layers: ``sigma`` an array or None, ``sigma_value`` the
    number used when it is None (then the result has no ``grad_sigma``: a number gets none)."""

    def call(sigma=None, sigma_value=1.0, **arguments):
        result = function(sigma=sigma_value if sigma is None else sigma, **arguments)
        return result._replace(grad_sigma=None) if sigma is None and hasattr(result, "grad_sigma") else result

    return call


def peaks_of_detections(detections, xp):
    """:class:`HoughPeaks` of the [N, K, 6] detections of :func:`pydeform.centernet_decode` run
    on votes with zero sizes and offsets (each detection's (x1, y1) is its peak cell)."""
    found = detections[:, :, 5] >= 0
    # stack: a new C-contiguous (y, x) array, where a column gather would keep a strided layout.
    cells = xp.stack([detections[:, :, 1], detections[:, :, 0]], axis=-1)
    centers = xp.where(found[:, :, None], cells, np.float32(np.nan))
    return HoughPeaks(centers.astype(np.float32), xp.where(found, detections[:, :, 4], 0).astype(np.int32))


@dlpack_entry
def semiconv_embed(phi, spacing=1.0, *, backend=None):
    """psi = phi with the pixel coordinates added: ``psi[:, 0, y, x] = phi[:, 0, y, x] + sy * y``,
    ``psi[:, 1, y, x] = phi[:, 1, y, x] + sx * x``, other channels unchanged (docs/semiconv.md).

    Args:
        phi (Tensor[N, D, H, W]): embeddings, D >= 2.
        spacing (float or (float, float)): (sy, sx), the coordinate scale per axis.

    Returns:
        Tensor[N, D, H, W]: psi, phi's dtype.
    """
    _require(phi=phi)
    library, _ = check_arrays({"phi": phi}, ranks={"phi": 4})
    xp = _kernels(library, backend).xp
    cy, cx = coordinate_offsets("phi", shape_of(phi), True, spacing)
    height, width = shape_of(phi)[2:]
    psi = output(xp, "output", shape_of(phi), phi.dtype)
    psi[...] = phi
    # Broadcast rows and columns: the [H, W] grid is never formed.
    psi[:, 0] += (cy[0] * xp.arange(height, dtype=np.float64)).astype(phi.dtype)[:, None]
    psi[:, 1] += (cx[1] * xp.arange(width, dtype=np.float64)).astype(phi.dtype)[None, :]
    return psi


def _statistics(kernels, psi, labels, offsets, num_instances, *, with_norms):
    """The kernel set's per-instance statistics in scratch: (sums or means, counts, norm_sums,
    unit_sums)."""
    n, dims = shape_of(psi)[:2]
    xp, acc = kernels.xp, kernels.statistics_dtype(psi.dtype)
    sums = scratch(xp, "semiconv_means", (n, num_instances, dims), acc)
    counts = scratch(xp, "semiconv_counts", (n, num_instances), np.int64)
    norm_sums = scratch(xp, "semiconv_norm_sums", (n, num_instances), acc)
    unit_sums = scratch(xp, "semiconv_unit_sums", (n, num_instances, dims), acc)
    kernels.statistics(psi, labels, offsets, sums, counts, norm_sums, unit_sums, with_norms=with_norms)
    return sums, counts, norm_sums, unit_sums


def _loss_call(psi, labels, num_instances, reduction, coordinates, spacing, backend):
    _require(labels=labels)
    library, _ = _embedding(psi, {})
    kernels = _kernels(library, backend)
    num_instances = check_int("num_instances", num_instances, minimum=1)
    reduction_index = _choice("reduction", reduction, REDUCTIONS)
    offsets = coordinate_offsets("psi", shape_of(psi), coordinates, spacing)
    labels = _labels(labels, psi, library, num_instances, kernels.xp)
    return kernels, kernels.xp.ascontiguousarray(psi), labels, num_instances, REDUCTIONS[reduction_index], offsets


@dlpack_entry
def instance_means(psi, labels, num_instances, *, coordinates=False, spacing=1.0, backend=None):
    """The mean embedding and the pixel count of every instance (docs/semiconv.md).

    Args:
        psi (Tensor[N, D, H, W]): embeddings (phi with ``coordinates=True``).
        labels (Tensor[N, H, W]): integer labels in [0, num_instances], 0 = background.
        num_instances (int): K >= 1.
        coordinates (bool), spacing: add the pixel coordinates to psi first.

    Returns:
        InstanceMeans: means [N, K, D] in psi's dtype (0 where an instance is empty) and counts
        int64 [N, K].
    """
    kernels, psi, labels, num_instances, _, offsets = _loss_call(psi, labels, num_instances, "mean", coordinates,
                                                                 spacing, backend)
    sums, counts, _, _ = _statistics(kernels, psi, labels, offsets, num_instances, with_norms=False)
    xp = kernels.xp
    means = output(xp, "means", sums.shape, psi.dtype)
    xp.divide(sums, xp.maximum(counts, 1)[:, :, None], out=means, casting="unsafe")
    kept_counts = output(xp, "counts", counts.shape, counts.dtype)
    kept_counts[...] = counts
    return InstanceMeans(means, kept_counts)


def _reduce(losses, counts, reduction, xp):
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "mean":
        total = total / max(int(xp.count_nonzero(counts)), 1)
    return xp.asarray(total)


@dlpack_entry
def instance_mean_loss(psi, labels, num_instances, reduction="mean", *, coordinates=False, spacing=1.0,
                       return_statistics=False, backend=None):
    """The instance mean loss of the semi-convolutional paper (eq. 5, un-squared distance).

    ``L[n, k] = (1/|S|) sum over u in S of ||psi_u - mean_S||`` for the pixels S of instance k
    of image n (0 for an empty instance). Deterministic.

    Args:
        psi (Tensor[N, D, H, W]): embeddings (phi with ``coordinates=True``).
        labels (Tensor[N, H, W]): integer labels in [0, num_instances], 0 = background.
        num_instances (int): K >= 1.
        reduction (str): "none" (L [N, K]), "sum", or "mean" (the sum over the number of
            non-empty instances, 0 if none).
        return_statistics (bool): also return the :class:`InstanceLossStatistics` that
            :func:`instance_mean_loss_backward` takes as ``statistics`` (it then reads psi once
            instead of three times).

    Returns:
        Tensor[N, K] or Tensor[]: psi's dtype; with ``return_statistics`` the pair
        ``(loss, InstanceLossStatistics)``.
    """
    return_statistics = check_bool("return_statistics", return_statistics)
    kernels, psi, labels, num_instances, reduction, offsets = _loss_call(psi, labels, num_instances, reduction,
                                                                         coordinates, spacing, backend)
    means, counts, norm_sums, unit_sums = _statistics(kernels, psi, labels, offsets, num_instances, with_norms=True)
    xp = kernels.xp
    losses = norm_sums / xp.maximum(counts, 1)
    result = _reduce(losses, counts, reduction, xp)
    out = output(xp, "output", result.shape, psi.dtype)
    out[...] = result
    if not return_statistics:
        return out
    statistics = InstanceLossStatistics(*(output(xp, name, value.shape, value.dtype) for name, value in
                                          (("means", means), ("counts", counts), ("unit_sums", unit_sums))))
    for kept, value in zip(statistics, (means, counts, unit_sums)):
        kept[...] = value
    return out, statistics


def _saved_statistics(statistics, kernels, psi, num_instances):
    """Check the ``statistics`` a forward returned for psi [N, D, H, W] and K instances."""
    if not isinstance(statistics, InstanceLossStatistics):
        raise TypeError(f"statistics: expected the InstanceLossStatistics of instance_mean_loss(..., "
                        f"return_statistics=True), got {type(statistics).__qualname__}")
    n, dims = shape_of(psi)[:2]
    acc = kernels.statistics_dtype(psi.dtype)
    expected = {"means": ((n, num_instances, dims), acc), "counts": ((n, num_instances), np.dtype(np.int64)),
                "unit_sums": ((n, num_instances, dims), acc)}
    for name, value in statistics._asdict().items():
        shape, dtype = expected[name]
        if array_library(f"statistics.{name}", value) != array_library("psi", psi):
            raise TypeError(f"statistics.{name}: expected an array of psi's library")
        if np.dtype(value.dtype) != dtype:
            raise TypeError(f"statistics.{name}: expected dtype {dtype.name}, got {np.dtype(value.dtype).name}")
        _check_shape(f"statistics.{name}", shape_of(value), shape)
    return tuple(kernels.xp.ascontiguousarray(value) for value in statistics)


@dlpack_entry
def instance_mean_loss_backward(grad_output, psi, labels, num_instances, reduction="mean", *, coordinates=False,
                                spacing=1.0, statistics=None, backend=None):
    """Gradient of :func:`instance_mean_loss` with respect to psi (or phi with coordinates):
    ``w[n, k] / |S| * (e_u - mean over S of e)`` inside instance k, with the unit vector
    ``e_u = (psi_u - mean_S) / ||psi_u - mean_S||`` (0 where that norm is 0) and ``w`` the
    reduction's weight times grad_output; 0 on the background.

    Args:
        grad_output (Tensor[N, K] for "none", else Tensor[] or a number): the loss's gradient.
        psi, labels, num_instances, reduction, coordinates, spacing: as for the loss.
        statistics (InstanceLossStatistics, optional): the forward's, from
            ``instance_mean_loss(..., return_statistics=True)`` on the same psi and labels; the
            backward then makes one pass over psi instead of recomputing them in two.

    Returns:
        Tensor[N, D, H, W]: psi's dtype.
    """
    kernels, psi, labels, num_instances, reduction, offsets = _loss_call(psi, labels, num_instances, reduction,
                                                                         coordinates, spacing, backend)
    n = shape_of(psi)[0]
    xp, acc = kernels.xp, kernels.statistics_dtype(psi.dtype)
    grad_output = _grad_output(grad_output, psi, (n, num_instances) if reduction == "none" else (), xp)
    if statistics is None:
        means, counts, _, unit_sums = _statistics(kernels, psi, labels, offsets, num_instances, with_norms=True)
    else:
        means, counts, unit_sums = _saved_statistics(statistics, kernels, psi, num_instances)
    weights = xp.broadcast_to(grad_output.astype(np.float64), counts.shape)
    if reduction == "mean":
        weights = weights / max(int(xp.count_nonzero(counts)), 1)
    sizes = xp.maximum(counts, 1)
    scales = xp.ascontiguousarray(weights / sizes, dtype=acc)
    mean_units = xp.ascontiguousarray(unit_sums / sizes[:, :, None], dtype=acc)
    grad = output(xp, "grad_psi", shape_of(psi), psi.dtype)
    kernels.loss_grad(psi, labels, offsets, means, scales, mean_units, grad)
    return grad


def _affinity_call(psi, centers, sigma, kernel, coordinates, spacing, backend):
    library, _ = _embedding(psi, {"centers": (centers, 3)})
    kernels = _kernels(library, backend)
    n, dims = shape_of(psi)[:2]
    if shape_of(centers)[0] != n or shape_of(centers)[2] != dims:
        raise ValueError(f"centers: expected shape [{n}, K, {dims}] for psi of shape {shape_of(psi)}, "
                         f"got {shape_of(centers)}")
    kernel_index = _choice("kernel", kernel, AFFINITY_KERNELS)
    offsets = coordinate_offsets("psi", shape_of(psi), coordinates, spacing)
    sigma, scalar = _sigma(sigma, psi, shape_of(centers)[:2], kernels)
    xp = kernels.xp
    return kernels, xp.ascontiguousarray(psi), xp.ascontiguousarray(centers), sigma, scalar, kernel_index, offsets


@dlpack_entry
def affinity(psi, centers, sigma, kernel="laplacian", *, coordinates=False, spacing=1.0, backend=None):
    """The affinity of every pixel to every center: ``exp(-d / sigma)`` ("laplacian") or
    ``exp(-d^2 / (2 sigma^2))`` ("gaussian"), d = ||psi_u - centers[n, k]||.

    Args:
        psi (Tensor[N, D, H, W]): embeddings (phi with ``coordinates=True``).
        centers (Tensor[N, K, D]): psi's dtype.
        sigma (float > 0, or Tensor[N, K] of psi's dtype with values > 0): the kernel width.
        kernel (str): "laplacian" or "gaussian".

    Returns:
        Tensor[N, K, H, W]: psi's dtype.
    """
    kernels, psi, centers, sigma, _, kernel_index, offsets = _affinity_call(psi, centers, sigma, kernel,
                                                                            coordinates, spacing, backend)
    n, _, height, width = shape_of(psi)
    out = output(kernels.xp, "output", (n, centers.shape[1], height, width), psi.dtype)
    kernels.affinity(psi, centers, sigma, offsets, out, kernel_index)
    return out


@dlpack_entry
def affinity_backward(grad_output, psi, centers, sigma, kernel="laplacian", *, coordinates=False, spacing=1.0,
                      backend=None):
    """Gradients of :func:`affinity` for psi, centers and sigma (the unit vector of the
    laplacian's distance is 0 at d = 0). Sums run in a fixed order.

    Returns:
        AffinityGrads: grad_psi [N, D, H, W], grad_centers [N, K, D] and grad_sigma (a 0-d array
        when sigma is a number, else [N, K]), psi's dtype.
    """
    kernels, psi, centers, sigma, scalar, kernel_index, offsets = _affinity_call(psi, centers, sigma, kernel,
                                                                                 coordinates, spacing, backend)
    n, dims, height, width = shape_of(psi)
    xp = kernels.xp
    grad_output = _grad_output(grad_output, psi, (n, centers.shape[1], height, width), xp)
    grad_psi = output(xp, "grad_psi", shape_of(psi), psi.dtype)
    grad_centers = output(xp, "grad_centers", shape_of(centers), psi.dtype)
    sigma_grads = scratch(xp, "semiconv_grad_sigma", sigma.shape, sigma.dtype)
    kernels.affinity_grad(grad_output, psi, centers, sigma, offsets, grad_psi, grad_centers, sigma_grads,
                          kernel_index)
    return AffinityGrads(grad_psi, grad_centers, _sigma_grad(sigma_grads, scalar, psi.dtype, xp))


def _sigma_grad(sigma_grads, scalar, dtype, xp):
    result = sigma_grads.sum() if scalar else sigma_grads
    grad = output(xp, "grad_sigma", result.shape, dtype)
    grad[...] = result
    return grad


def _seeded_call(scores, psi, sigma, mode, coordinates, spacing, backend):
    _require(scores=scores)
    library, _ = _embedding(psi, {"scores": (scores, 3)})
    kernels = _kernels(library, backend)
    regions, _, height, width = shape_of(psi)
    _check_shape("scores", shape_of(scores), (regions, height, width))
    if not height * width:
        raise ValueError(f"psi: expected at least one pixel per region, got shape {shape_of(psi)}")
    mode_index = _choice("mode", mode, SEED_MODES)
    offsets = coordinate_offsets("psi", shape_of(psi), coordinates, spacing)
    sigma, scalar = _sigma(sigma, psi, (regions,), kernels)
    xp = kernels.xp
    return kernels, xp.ascontiguousarray(scores), xp.ascontiguousarray(psi), sigma, scalar, mode_index, offsets


def _seed_buffers(kernels, psi):
    regions, dims, height, width = shape_of(psi)
    acc = kernels.statistics_dtype(psi.dtype)
    return (scratch(kernels.xp, "semiconv_seeds", (regions, dims), acc),
            scratch(kernels.xp, "semiconv_seed_weights", (regions, height, width), acc))


@dlpack_entry
def seeded_mask_logits(scores, psi, sigma, mode="argmax", *, coordinates=False, spacing=1.0, backend=None):
    """Mask logits of regions from a seed embedding: ``scores - ||psi_u - seed|| / sigma``.

    The seed is psi at the highest score (ties: the lowest flat index) with ``mode="argmax"``,
    or the softmax(scores)-weighted mean of psi with ``mode="softmax"``.

    Args:
        scores (Tensor[R, h, w]): per-region seediness scores, psi's dtype.
        psi (Tensor[R, D, h, w]): the regions' embeddings (phi with ``coordinates=True``).
        sigma (float > 0, or Tensor[R] with values > 0).
        mode (str): "argmax" or "softmax".

    Returns:
        Tensor[R, h, w]: psi's dtype.
    """
    kernels, scores, psi, sigma, _, mode_index, offsets = _seeded_call(scores, psi, sigma, mode, coordinates,
                                                                       spacing, backend)
    out = output(kernels.xp, "output", shape_of(scores), psi.dtype)
    kernels.seeded(scores, psi, sigma, offsets, *_seed_buffers(kernels, psi), out, mode_index)
    return out


@dlpack_entry
def seeded_mask_logits_backward(grad_output, scores, psi, sigma, mode="argmax", *, coordinates=False, spacing=1.0,
                                backend=None):
    """Gradients of :func:`seeded_mask_logits` for scores, psi and sigma. With "argmax" no
    gradient flows through the choice of the seed pixel (its psi gets the seed's gradient);
    with "softmax" the seed's gradient reaches every pixel's psi and score.

    Returns:
        SeededMaskGrads: grad_scores [R, h, w], grad_psi [R, D, h, w], grad_sigma (0-d for a
        number, else [R]), psi's dtype.
    """
    kernels, scores, psi, sigma, scalar, mode_index, offsets = _seeded_call(scores, psi, sigma, mode, coordinates,
                                                                            spacing, backend)
    xp = kernels.xp
    grad_output = _grad_output(grad_output, psi, shape_of(scores), xp)
    grad_scores = output(xp, "grad_scores", shape_of(scores), psi.dtype)
    grad_psi = output(xp, "grad_psi", shape_of(psi), psi.dtype)
    seeds, weights = _seed_buffers(kernels, psi)
    grad_seeds = scratch(xp, "semiconv_grad_seeds", seeds.shape, seeds.dtype)
    sigma_grads = scratch(xp, "semiconv_grad_sigma", sigma.shape, sigma.dtype)
    kernels.seeded_grad(grad_output, scores, psi, sigma, offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                        sigma_grads, mode_index)
    return SeededMaskGrads(grad_scores, grad_psi, _sigma_grad(sigma_grads, scalar, psi.dtype, xp))


@dlpack_entry
def hough_votes(psi, foreground, shape=None, *, coordinates=False, spacing=1.0, backend=None):
    """Vote counts: each foreground pixel adds 1 at ``(round(psi_0), round(psi_1))`` (rounding
    half away from zero) when that cell is inside the map; NaN votes are dropped.

    Args:
        psi (Tensor[N, D, H, W]): embeddings, D >= 2; channels 0 and 1 vote (phi with
            ``coordinates=True``: then the votes are pixel positions plus phi's displacements).
        foreground (Tensor[N, H, W]): bool, the voting pixels.
        shape ((int, int), optional): (H', W') of the vote map, default (H, W).

    Returns:
        Tensor[N, H', W']: int32 counts.
    """
    _require(foreground=foreground)
    library, _ = _embedding(psi, {})
    kernels = _kernels(library, backend)
    n, dims, height, width = shape_of(psi)
    if dims < 2:
        raise ValueError(f"psi: expected D >= 2 channels (the vote's y and x), got shape {shape_of(psi)}")
    out_h, out_w = (height, width) if shape is None else int_pair("shape", shape, minimum=1)
    offsets = coordinate_offsets("psi", shape_of(psi), coordinates, spacing)
    xp = kernels.xp
    foreground = _foreground(foreground, psi, library, xp)
    counts = output(xp, "output", (n, out_h, out_w), np.int32)
    kernels.votes(xp.ascontiguousarray(psi), foreground, offsets, counts)
    return counts


@dlpack_entry
def hough_peaks(votes, K, *, min_votes=1, kernel=3, backend=None):
    """The K strongest local maxima of each vote map, by CenterNet's peak test and top-K
    (:func:`pydeform.centernet_decode`: a cell is a peak iff it equals the maximum of its
    ``kernel`` x ``kernel`` window; equal counts by the lowest flat index ``y * W + x``).

    Args:
        votes (Tensor[N, H, W]): int32 counts (:func:`hough_votes`).
        K (int): peaks per image, >= 1.
        min_votes (int): a peak needs at least this many votes (>= 1); slots without one get
            NaN centers and 0 votes.
        kernel (int): the odd peak window size.

    Returns:
        HoughPeaks: centers float32 [N, K, 2] (y, x) and votes int32 [N, K].
    """
    _require(votes=votes)
    lib = array_library("votes", votes)
    if np.dtype(votes.dtype) != np.int32:
        raise TypeError(f"votes: expected dtype int32, got {np.dtype(votes.dtype).name}")
    if votes.ndim != 3:
        raise ValueError(f"votes: expected a 3-d array [N, H, W], got shape {shape_of(votes)}")
    xp = _kernels(lib, backend).xp
    K = check_int("K", K, minimum=1)
    min_votes = check_int("min_votes", min_votes, minimum=1)
    n, height, width = shape_of(votes)
    heat = votes.astype(np.float32).reshape(n, 1, height, width)
    zeros = xp.zeros((n, 2, height, width), np.float32)
    detections = centernet_decode(heat, zeros, zeros, K, kernel=kernel, threshold=float(min_votes), backend=backend)
    return peaks_of_detections(detections, xp)


@dlpack_entry
def assign_to_centers(psi, foreground, centers, max_distance=math.inf, *, coordinates=False, spacing=1.0,
                      backend=None):
    """Label every foreground pixel with its nearest center: ``1 + argmin_k ||psi_u - c_k||``
    (ties: the lowest k; a center with a NaN coordinate is never nearest); 0 off the
    foreground, and where no center is within ``max_distance``.

    Args:
        psi (Tensor[N, D, H, W]): embeddings (phi with ``coordinates=True``).
        foreground (Tensor[N, H, W]): bool.
        centers (Tensor[N, K, D]): psi's dtype (e.g. :func:`hough_peaks`' centers with D = 2).
        max_distance (float): >= 0, inf by default.

    Returns:
        Tensor[N, H, W]: int32 labels in [0, K].
    """
    library, _ = _embedding(psi, {"centers": (centers, 3)})
    kernels = _kernels(library, backend)
    n, dims, height, width = shape_of(psi)
    if shape_of(centers)[0] != n or shape_of(centers)[2] != dims:
        raise ValueError(f"centers: expected shape [{n}, K, {dims}] for psi of shape {shape_of(psi)}, "
                         f"got {shape_of(centers)}")
    if isinstance(max_distance, bool) or not isinstance(max_distance, numbers.Real) or not max_distance >= 0:
        raise ValueError(f"max_distance: expected a number >= 0 (inf allowed), got {max_distance!r}")
    offsets = coordinate_offsets("psi", shape_of(psi), coordinates, spacing)
    xp = kernels.xp
    foreground = _foreground(foreground, psi, library, xp)
    labels = output(xp, "output", (n, height, width), np.int32)
    kernels.assign(xp.ascontiguousarray(psi), foreground, xp.ascontiguousarray(centers), offsets, labels,
                   float(max_distance))
    return labels
