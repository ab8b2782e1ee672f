// The deterministic backward's contribution lists: a counting sort of a scatter's contributions
// by target bucket, so that each target element can sum its own list in a fixed order instead
// of receiving float atomics in whatever order the threads run.
//
// A contribution is (item, local, weight): the work item that makes it, its index among that
// item's contributions (both fixed by the inputs, not by the launch) and its weight. The driver
// (pydeform/_contributions.py) runs the steps:
//   1. count: count_contribution(bucket_counts, bucket) per contribution (integer atomics:
//      the counts do not depend on the order);
//   2. scan:  bucket_ends = inclusive prefix sum of the counts, the cursors set to the starts;
//   3. fill:  slot = claim_slot(cursors, bucket) and the contribution stored there (the order
//      inside a bucket is the threads' order);
//   4. sort:  sort_contribution_lists orders each bucket by (item, local);
//   5. gather: each target element sums its bucket from bucket_begin to bucket_ends[bucket].
#pragma once

#include "common.cuh"

namespace pydeform {

using bucket_t = unsigned long long;

__device__ __forceinline__ void count_contribution(bucket_t* __restrict__ bucket_counts,
                                                   const long long bucket) {
    atomicAdd(bucket_counts + bucket, bucket_t(1));
}

// The next free slot of `bucket`; the cursors start at the buckets' first slots.
__device__ __forceinline__ long long claim_slot(bucket_t* __restrict__ cursors, const long long bucket) {
    return static_cast<long long>(atomicAdd(cursors + bucket, bucket_t(1)));
}

__device__ __forceinline__ long long bucket_begin(const bucket_t* __restrict__ bucket_ends,
                                                  const long long bucket) {
    return bucket > 0 ? static_cast<long long>(bucket_ends[bucket - 1]) : 0;
}

// The contribution lists, one slot per contribution, grouped by bucket.
template <typename A>
struct ContributionLists {
    long long* item;
    long long* local;
    A* weight;
};

template <typename A>
__device__ __forceinline__ void store_contribution(const ContributionLists<A>& lists,
                                                   const long long slot, const long long item,
                                                   const long long local, const A weight) {
    lists.item[slot] = item;
    lists.local[slot] = local;
    lists.weight[slot] = weight;
}

template <typename A>
__device__ __forceinline__ bool contribution_before(const ContributionLists<A>& lists,
                                                    const long long a, const long long b) {
    return lists.item[a] < lists.item[b] ||
           (lists.item[a] == lists.item[b] && lists.local[a] < lists.local[b]);
}

template <typename A>
__device__ __forceinline__ void swap_contributions(const ContributionLists<A>& lists,
                                                   const long long a, const long long b) {
    const long long item = lists.item[a], local = lists.local[a];
    const A weight = lists.weight[a];
    lists.item[a] = lists.item[b];
    lists.local[a] = lists.local[b];
    lists.weight[a] = lists.weight[b];
    lists.item[b] = item;
    lists.local[b] = local;
    lists.weight[b] = weight;
}

// Restores the max-heap property below `root` of the heap in slots [first, first + size).
template <typename A>
__device__ __forceinline__ void sift_down(const ContributionLists<A>& lists, const long long first,
                                          long long root, const long long size) {
    for (long long child = 2 * root + 1; child < size; child = 2 * root + 1) {
        if (child + 1 < size && contribution_before(lists, first + child, first + child + 1)) {
            ++child;
        }
        if (!contribution_before(lists, first + root, first + child)) {
            return;
        }
        swap_contributions(lists, first + root, first + child);
        root = child;
    }
}

// Heap sort of slots [first, first + size) by (item, local), keys all distinct: O(n log n) even
// for a bucket that every sample hits.
template <typename A>
__device__ __forceinline__ void sort_bucket(const ContributionLists<A>& lists, const long long first,
                                            const long long size) {
    for (long long root = size / 2 - 1; root >= 0; --root) {
        sift_down(lists, first, root, size);
    }
    for (long long end = size - 1; end > 0; --end) {
        swap_contributions(lists, first, first + end);
        sift_down(lists, first, 0, end);
    }
}

// One bucket per work item of the grid-stride loop.
template <typename A>
__device__ __forceinline__ void sort_contribution_lists(const long long n_buckets,
                                                        const bucket_t* __restrict__ bucket_ends,
                                                        const ContributionLists<A>& lists) {
    for (long long bucket = grid_stride_begin(); bucket < n_buckets; bucket += grid_stride_step()) {
        const long long first = bucket_begin(bucket_ends, bucket);
        sort_bucket(lists, first, static_cast<long long>(bucket_ends[bucket]) - first);
    }
}

}  // namespace pydeform

// The list arguments of a kernel templated on T, as they travel: the fill's (or count's) cursors
// and the lists, and the sorted lists a gather reads.
#define PYDEFORM_CONTRIBUTION_LIST_PARAMS                                                         \
    pydeform::bucket_t* __restrict__ cursors, long long* __restrict__ contribution_item,        \
        long long* __restrict__ contribution_local,                                             \
        pydeform::acc_t<T>* __restrict__ contribution_weight
#define PYDEFORM_CONTRIBUTION_LISTS                                                                \
    pydeform::ContributionLists<pydeform::acc_t<T>> {                                           \
        contribution_item, contribution_local, contribution_weight                              \
    }
#define PYDEFORM_SORTED_LIST_PARAMS                                                               \
    const pydeform::bucket_t* __restrict__ bucket_ends,                                         \
        const long long* __restrict__ contribution_item,                                        \
        const pydeform::acc_t<T>* __restrict__ contribution_weight

// Step 4 of every deterministic backward: one bucket per work item.
template <typename T>
__global__ void contribution_lists_sort(const long long n_buckets, const pydeform::bucket_t* __restrict__ bucket_ends,
                                        long long* __restrict__ contribution_item,
                                        long long* __restrict__ contribution_local,
                                        pydeform::acc_t<T>* __restrict__ contribution_weight) {
    pydeform::sort_contribution_lists(n_buckets, bucket_ends, PYDEFORM_CONTRIBUTION_LISTS);
}
