"""Marshalling of ``contributions.cuh``'s sort kernel, which every ``.cu`` file with a
deterministic backward includes (and so lists in its manifest)."""

import numpy as np

SORT_TEMPLATE = "contribution_lists_sort"


def sort_launch(bucket_ends, item, local, weight):
    """One work item per bucket."""
    n_buckets = bucket_ends.size
    return SORT_TEMPLATE, n_buckets, (np.int64(n_buckets), bucket_ends, item, local, weight)
