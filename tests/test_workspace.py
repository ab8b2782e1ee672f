"""The per-thread scratch buffers the drivers reuse on the CPU."""

import threading

import numpy as np

import pydeform
from pydeform import _workspace
from pydeform._workspace import scratch


def test_a_slot_is_reused_across_calls():
    first = scratch(np, "test-slot", (3, 4), np.float32)
    second = scratch(np, "test-slot", (2, 5), np.float32)
    assert second.shape == (2, 5) and second.dtype == np.float32
    assert np.shares_memory(first, second)


def test_slots_and_dtypes_never_share_memory():
    a = scratch(np, "test-a", (8,), np.float32)
    b = scratch(np, "test-b", (8,), np.float32)
    c = scratch(np, "test-a", (8,), np.float64)
    assert not np.shares_memory(a, b)
    assert not np.shares_memory(a, c)


def test_threads_never_share_a_buffer():
    seen = {}

    def take(name):
        seen[name] = scratch(np, "test-thread", (16,), np.float32)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.shares_memory(seen[0], seen[1])


def test_buffers_over_the_cache_limit_are_not_kept(monkeypatch):
    monkeypatch.setattr(_workspace, "CACHED_WORKSPACE_BYTES", 64)
    a = scratch(np, "test-large", (32,), np.float32)
    b = scratch(np, "test-large", (32,), np.float32)
    assert not np.shares_memory(a, b)


def test_concurrent_deform_conv2d_calls_give_the_sequential_results():
    rng = np.random.default_rng(7)
    cases = []
    for _ in range(4):
        x = rng.standard_normal((2, 4, 9, 9))
        offset = rng.uniform(-2, 2, (2, 18, 9, 9))
        weight = rng.standard_normal((5, 4, 3, 3))
        cases.append((x, offset, weight))
    expected = [pydeform.deform_conv2d(x, o, w, padding=1) for x, o, w in cases]
    results = [None] * len(cases)

    def run(i):
        for _ in range(20):
            x, o, w = cases[i]
            results[i] = pydeform.deform_conv2d(x, o, w, padding=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
