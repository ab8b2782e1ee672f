"""The deterministic backward's driver: a scatter turned into per-target sums in a fixed order.

A backward that scatters with float atomics (deform_conv2d's input gradient, the RoI ops' input
gradients) gives results whose last bits depend on the order in which the GPU's threads happen
to run. Its deterministic mode sorts the scatter's *contributions* by target *bucket* first (a
counting sort; a bucket is an image pixel, or an image pixel of an offset group / channel class,
shared by the channels that sample at the same positions) and then lets each target element sum
its bucket's list in the order of the contributions' ``(item, local)`` keys, which the inputs
fix, so the bits are the same in every run and for every grid size. Extra memory: two 8-byte
counters per bucket and 16 bytes plus one accumulation-type weight per contribution.

The steps are kernels of the kernel set (``count``, ``fill``, ``sort``, ``gather``; see
``pydeform/backends/cupy_kernels/contributions.cuh`` and
``pydeform/backends/numba_kernels/contributions.py``); the prefix sum is the array library's
``cumsum`` on integers, exact and so order-independent. The layouts below (buckets, capacity,
scratch plans) are shared by the GPU kernel sets.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from ._arrays import accumulation_dtype
from ._workspace import scratch

BUCKET_DTYPE = np.dtype(np.uint64)
KEY_DTYPE = np.dtype(np.int64)


class ContributionLists(NamedTuple):
    """Sorted lists: bucket b's contributions are slots ``[bucket_ends[b-1], bucket_ends[b])``."""

    bucket_ends: object
    item: object
    local: object
    weight: object


def contribution_plan(n_buckets: int, capacity: int, acc_dtype) -> dict:
    """The scratch slots of :func:`contribution_lists` for ``n_buckets`` buckets and room for
    ``capacity`` contributions: ``{slot: (shape, dtype)}``."""
    return {
        "bucket_counts": ((n_buckets,), BUCKET_DTYPE),
        "bucket_ends": ((n_buckets,), BUCKET_DTYPE),
        "contribution_item": ((capacity,), KEY_DTYPE),
        "contribution_local": ((capacity,), KEY_DTYPE),
        "contribution_weight": ((capacity,), np.dtype(acc_dtype)),
    }


def contribution_lists(xp, n_buckets: int, capacity, acc_dtype, count, fill, sort) -> ContributionLists:
    """Count, scan, fill and sort the contributions of a scatter into ``n_buckets`` buckets.

    ``count(bucket_counts)`` adds 1 per contribution to its bucket's counter (zero-filled here);
    ``fill(cursors, item, local, weight)`` stores each contribution at the slot it claims from
    its bucket's cursor; ``sort(bucket_ends, item, local, weight)`` orders each bucket by
    ``(item, local)``. ``capacity`` bounds the number of contributions, or is None when only the
    count can tell (the total is then read back from the device).
    """
    counts = scratch(xp, "bucket_counts", (n_buckets,), BUCKET_DTYPE)
    counts.fill(0)
    count(counts)
    ends = scratch(xp, "bucket_ends", (n_buckets,), BUCKET_DTYPE)
    xp.cumsum(counts, out=ends)
    if capacity is None:
        capacity = int(ends[-1]) if n_buckets else 0
    # The counters become the fill's cursors, starting at each bucket's first slot.
    xp.subtract(ends, counts, out=counts)
    lists = ContributionLists(
        ends,
        scratch(xp, "contribution_item", (capacity,), KEY_DTYPE),
        scratch(xp, "contribution_local", (capacity,), KEY_DTYPE),
        scratch(xp, "contribution_weight", (capacity,), acc_dtype),
    )
    fill(counts, lists.item, lists.local, lists.weight)
    sort(ends, lists.item, lists.local, lists.weight)
    return lists


def col2im_buckets(batch: int, geometry) -> int:
    """deform_conv2d's deterministic input gradient on ``batch`` images: a bucket per (image,
    offset group, input pixel), shared by the group's channels."""
    g = geometry
    return batch * g.offset_groups * g.height * g.width


def col2im_capacity(batch: int, geometry) -> int:
    """At most four contributions (the bilinear corners) per sample (image, offset group,
    kernel point, output pixel)."""
    g = geometry
    return 4 * batch * g.offset_groups * g.kernel_h * g.kernel_w * g.out_h * g.out_w


def col2im_lists_plan(batch: int, geometry, dtype) -> dict:
    """The scratch of deform_conv2d's deterministic input gradient on ``batch`` images."""
    return contribution_plan(col2im_buckets(batch, geometry), col2im_capacity(batch, geometry),
                             accumulation_dtype(dtype))


class RoIContributionLayout(NamedTuple):
    """The contribution lists of a RoI op's input gradient.

    Its work items are *position items* ``(k, q, ph, pw)`` of ``[K, Q, PH, PW]``: the bins whose
    sample positions output channels ``q * position_step ...`` share (``Q = 1`` where every
    channel samples alike; one per channel for the max modes, whose arg-max is the channel's
    own; one per class for deform_psroi_pool, whose trans is per class). A contribution to
    input element ``(image, c, pixel)`` goes to bucket ``(image * classes + class(c)) * H*W +
    pixel`` with ``class(c) = c // cells // class_step * cells + c % cells``: the input channels
    of one class read the same positions. ``capacity`` bounds the contributions, or is None
    where the boxes decide (adaptive sampling, ps_roi_pool's bins: the count is then read back);
    ``planned_capacity`` is the bound a plan made ahead of the boxes (pydeform.jax) reserves:
    ``capacity``, or for ps_roi_pool the most any boxes can make, None where no bound is sane."""

    position_items: int
    position_channels: int
    position_step: int
    cells: int
    class_step: int
    classes: int
    buckets: int
    capacity: Optional[int]
    planned_capacity: Optional[int]


def roi_contribution_layout(family: str, input_shape, k: int, params) -> RoIContributionLayout:
    n, channels, height, width = input_shape
    if family == "deform_psroi_pool":
        bins = params.pooled_size ** 2
        per_item = 4 * params.sample_per_part ** 2
        q = params.num_classes
        step = params.output_dim // q
        cells, class_step = params.group_size ** 2, step
    else:
        bins = params.pooled_h * params.pooled_w
        channels_out = getattr(params, "channels_out", channels)
        if family == "roi_align":
            per_channel = params.max_mode
        else:
            per_channel = family == "roi_pool" and not params.position_sensitive
        sensitive = getattr(params, "position_sensitive", False)
        q, step = (channels_out, 1) if per_channel else (1, 1)
        # Per channel: a class per input channel; position-sensitive: per bin; else one class.
        cells, class_step = (1, 1) if per_channel else (bins if sensitive else 1, channels_out)
        if family == "roi_pool":
            per_item = 1 if per_channel else None
        else:
            ratio = params.sampling_ratio
            per_item = 4 if per_channel else 4 * ratio * ratio if ratio > 0 else None
    classes = channels // cells // class_step * cells
    items = k * q * bins
    capacity = planned = None if per_item is None else per_item * items
    if family == "roi_pool" and params.position_sensitive:
        # A ps_roi_pool bin contributes each of its pixels once. Its rows are
        # [floor(ph*h/PH), ceil((ph+1)*h/PH)) + y0 clipped to [0, H] (h the rounded box height),
        # and ceil(x) <= floor(x) + 1, so the rows of a roi's bins add up to at most H + PH - 1
        # (a telescoping sum; likewise the columns), whatever the box: at most
        # (H + PH - 1) * (W + PW - 1) contributions per roi. Adaptive sampling has no such bound
        # at a sane size (deform_roi_pool's offsets can stack every bin of a roi on one spot).
        planned = k * (height + params.pooled_h - 1) * (width + params.pooled_w - 1)
    return RoIContributionLayout(items, q, step, cells, class_step, classes, n * classes * height * width,
                                 capacity, planned)


def roi_param_partials_shape(family: str, output_size: int) -> tuple:
    """Each output element's share of the offset (x, y) and mask gradients for deform_roi_pool
    (``[3, K*C*PH*PW]``), of the trans (x, y) gradient for deform_psroi_pool (``[2, ...]``)."""
    return (3 if family == "deform_roi_pool" else 2, output_size)


def roi_lists_plan(family: str, params, shapes: dict, dtype) -> dict:
    """The scratch of a RoI op's deterministic backward (``shapes``: of ``input`` and ``output``,
    as for a kernel set's ``workspace``); raises ValueError where its size depends on the boxes."""
    output_shape = shapes["output"]
    layout = roi_contribution_layout(family, shapes["input"], output_shape[0], params)
    if layout.planned_capacity is None:
        raise ValueError(
            f"deterministic: the {family} backward's contribution lists depend on the box sizes with adaptive "
            "sampling, so they cannot be planned ahead; use a positive sampling_ratio"
        )
    acc = accumulation_dtype(dtype)
    plan = contribution_plan(layout.buckets, layout.planned_capacity, acc)
    if family in ("deform_roi_pool", "deform_psroi_pool"):
        plan["param_partials"] = (roi_param_partials_shape(family, math.prod(output_shape)), acc)
    return plan
