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
``pydeform/backends/cupy_kernels/contributions.cuh``); the prefix sum is the array library's
``cumsum`` on integers, exact and so order-independent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
