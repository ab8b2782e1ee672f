"""The deterministic backward's contribution lists for the Numba CUDA kernels: the Numba twin of
``pydeform/backends/cupy_kernels/contributions.cuh``, driven by :mod:`pydeform._contributions`.

A contribution is (item, local, weight): the work item that makes it, its index among that
item's contributions (both fixed by the inputs, not by the launch) and its weight. An op's
*lists* kernel calls :func:`list_functions`' ``add_contribution`` for each of its contributions,
once to count them into their buckets (integer atomics: the counts do not depend on the order)
and once, after the driver's prefix sum, to store each at the slot it claims from its bucket's
cursor (in whatever order the threads run); the sort kernel then orders each bucket by
``(item, local)``, and the op's gather kernel sums each bucket in that order.
"""

from __future__ import annotations

import functools

import numpy as np

from .targets import bind_cuda, cuda_kernel

# numba.cuda once a CUDA kernel is built (see targets.bind_cuda for why a module global).
cuda = None


def _device(fn):
    """A device function (no float arithmetic of its own: the same for every arithmetic type)."""
    return cuda.jit(device=True)(fn)


@functools.lru_cache(maxsize=None)
def list_functions():
    """The device functions ``(add_contribution, bucket_span)``."""
    global cuda
    cuda = bind_cuda()
    device = _device

    @device
    def add_contribution(cursors, items, locals_, weights, fill, bucket, item, local, weight):
        """Count a contribution into ``bucket`` (``fill`` false: ``cursors`` are the counts) or
        store it at the next free slot of ``bucket`` (the cursors start at the buckets' first
        slots)."""
        if fill:
            slot = np.int64(cuda.atomic.add(cursors, bucket, np.uint64(1)))
            items[slot] = item
            locals_[slot] = local
            weights[slot] = weight
        else:
            cuda.atomic.add(cursors, bucket, np.uint64(1))

    @device
    def bucket_span(bucket_ends, bucket):
        """(first slot, end slot) of ``bucket``'s sorted list."""
        first = np.int64(bucket_ends[bucket - 1]) if bucket > 0 else np.int64(0)
        return first, np.int64(bucket_ends[bucket])

    return add_contribution, bucket_span


@functools.lru_cache(maxsize=None)
def element_list_function():
    """The device function ``element_list(bucket_ends, element, channels, offset_groups,
    plane_size) -> (plane, first slot, end slot)``: the list of input element ``element =
    plane*H*W + pixel`` (``plane = b*C + c``) in the buckets ``(b*Goff + g)*H*W + pixel``
    shared by the channels of offset group g (deform_conv2d's col2im, deform_pool2d's input
    gradient)."""
    _, bucket_span = list_functions()

    @_device
    def element_list(bucket_ends, element, channels, offset_groups, plane_size):
        plane = element // plane_size
        batch = plane // channels
        group_row = batch * offset_groups + (plane - batch * channels) // (channels // offset_groups)
        first, end = bucket_span(bucket_ends, group_row * plane_size + element - plane * plane_size)
        return plane, first, end

    return element_list


@functools.lru_cache(maxsize=None)
def sort_kernel():
    """``sort_lists(bucket_ends, items, locals_, weights, n_buckets)``: each bucket's slots
    ordered by ``(item, local)``, one bucket per work item."""
    global cuda
    cuda = bind_cuda()
    device = _device
    _, bucket_span = list_functions()

    @device
    def before(items, locals_, a, b):
        return items[a] < items[b] or (items[a] == items[b] and locals_[a] < locals_[b])

    @device
    def swap(items, locals_, weights, a, b):
        items[a], items[b] = items[b], items[a]
        locals_[a], locals_[b] = locals_[b], locals_[a]
        weights[a], weights[b] = weights[b], weights[a]

    @device
    def sift_down(items, locals_, weights, first, root, size):
        """Restore the max-heap property below ``root`` of the heap in slots [first, first + size)."""
        child = 2 * root + 1
        while child < size:
            if child + 1 < size and before(items, locals_, first + child, first + child + 1):
                child += 1
            if not before(items, locals_, first + root, first + child):
                return
            swap(items, locals_, weights, first + root, first + child)
            root = child
            child = 2 * root + 1

    @cuda_kernel
    def sort_lists(bucket_ends, items, locals_, weights, n_buckets):
        # Heap sort (the keys are distinct): O(n log n) even for a bucket that every sample hits.
        for bucket in range(cuda.grid(1), n_buckets, cuda.gridsize(1)):
            first, end = bucket_span(bucket_ends, bucket)
            size = end - first
            root = size // 2 - 1
            while root >= 0:
                sift_down(items, locals_, weights, first, root, size)
                root -= 1
            last = size - 1
            while last > 0:
                swap(items, locals_, weights, first, first + last)
                sift_down(items, locals_, weights, first, 0, last)
                last -= 1

    return sort_lists


def stand_ins(xp, weight_dtype) -> tuple:
    """The list arguments of a counting launch (``fill`` false), never written: one-element
    arrays of their dtypes (not views of another argument: the CUDA simulator copies every host
    argument back after a launch)."""
    return xp.zeros(1, np.int64), xp.zeros(1, np.int64), xp.zeros(1, weight_dtype)
