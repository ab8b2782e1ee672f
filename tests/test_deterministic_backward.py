"""The deterministic backward (``deterministic=True``) of every op whose GPU backward scatters
with float atomics, checked on the CPU.

The CUDA C kernels run on the host shim's shuffled-threads model (tests/host_shim.py,
cuda_host_shim.h): every logical thread of a launch is one call, taken in a random order by
several OS threads, and atomicAdd is a real atomic add in the order the threads get there. On
inputs where many contributions meet at one pixel, the atomic backward's float32 bits then
change from shuffle to shuffle (asserted, so the model can tell), while the deterministic one's
never do, whatever the order, the grid size or the block size. Both agree with the float64
reference.
"""

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
import pydeform.deform_conv as deform_conv_module
import pydeform.roi as roi_module
import reference
from pydeform import deform_conv2d_backward
from tests import host_shim
from tests.strategies import (
    ROI_OPS, DeformConvCase, RoICase, assert_grads_close, assert_roi_grads_close, deform_conv_cases, roi_cases,
)

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

# (blocks, threads per block) of the shuffled launches: one block, a few, more blocks than work.
LAUNCHES = ((1, 32), (3, 32), (64, 16))
SEEDS = (0, 1, 2)


def _bits(grads) -> tuple:
    return tuple(None if g is None else g.tobytes() for g in grads)


@contextlib.contextmanager
def _deform_conv_kernels(kernels):
    with mock.patch.object(deform_conv_module, "deform_conv2d_kernels", lambda library, backend: kernels):
        yield


def crowded_deform_conv_case(dtype=np.float32, seed=0) -> DeformConvCase:
    """Every sample of a 3x3 kernel over a 6x6 output lands within a pixel of (2.3, 2.6), so
    each of those corner pixels receives hundreds of contributions per channel."""
    rng = np.random.default_rng(seed)
    n, channels, out = 2, 4, 6
    ys = np.arange(out).reshape(1, 1, 1, out, 1) + np.arange(3).reshape(1, 3, 1, 1, 1) - 1
    xs = np.arange(out).reshape(1, 1, 1, 1, out) + np.arange(3).reshape(1, 1, 3, 1, 1) - 1
    target = rng.uniform(-0.45, 0.45, (n, 3, 3, out, out, 2)) + (2.3, 2.6)
    offset = np.stack([target[..., 0] - ys, target[..., 1] - xs], axis=3).reshape(n, 18, out, out)
    return DeformConvCase(
        input=rng.standard_normal((n, channels, out, out)).astype(dtype),
        offset=offset.astype(dtype),
        weight=rng.standard_normal((3, channels, 3, 3)).astype(dtype),
        bias=None,
        mask=rng.uniform(0.2, 1.5, (n, 9, out, out)).astype(dtype),
        grad_output=rng.standard_normal((n, 3, out, out)).astype(dtype),
        stride=1, padding=1, dilation=1, groups=1, offset_groups=1,
    )


def _deform_conv_backward(case, kernels, deterministic):
    with _deform_conv_kernels(kernels):
        return deform_conv2d_backward(case.grad_output, **case.arguments(), deterministic=deterministic)


def shuffled_bits(kernel_set, backward) -> dict:
    """``{deterministic: the distinct bits of backward(kernels, deterministic)}`` over shuffled
    launches of every configuration of LAUNCHES and SEEDS; ``backward`` checks each result."""
    bits = {False: set(), True: set()}
    for deterministic in bits:
        for grid, block in LAUNCHES:
            for seed in SEEDS:
                bits[deterministic].add(backward(kernel_set(grid, block, seed), deterministic))
    assert len(bits[False]) > 1, "the shuffled shim did not change the atomic backward's bits"
    return bits


def test_deform_conv2d_shuffled_atomic_bits_change_deterministic_bits_do_not():
    case = crowded_deform_conv_case()
    expected = case.reference_backward()

    def backward(kernels, deterministic):
        grads = _deform_conv_backward(case, kernels, deterministic)
        assert_grads_close(grads, expected, np.float32)
        return _bits(grads)

    bits = shuffled_bits(host_shim.HostShimShuffledDeformConv2dKernels, backward)
    assert len(bits[True]) == 1
    # The offset / mask / weight gradients have no scatter: the same in both modes.
    (deterministic_bits,) = bits[True]
    assert all(bits_[1:] == deterministic_bits[1:] for bits_ in bits[False])


@settings(max_examples=20, deadline=None)
@given(data=st.data(), dtype=st.sampled_from((np.float32, np.float64)))
def test_deform_conv2d_deterministic_matches_reference(data, dtype):
    """All shapes of the strategy (empty batches, offset groups, samples outside the image)."""
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    grads = _deform_conv_backward(case, host_shim.HostShimDeformConv2dKernels(), True)
    assert_grads_close(grads, case.reference_backward(), dtype)


def test_deform_conv2d_deterministic_in_batch_chunks(monkeypatch):
    """Chunks of one image: each chunk's lists cover its own images, the bits are those of one
    chunk (the sums do not cross images)."""
    case = crowded_deform_conv_case(np.float64)
    whole = _deform_conv_backward(case, host_shim.HostShimDeformConv2dKernels(), True)
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", 1)
    chunked = _deform_conv_backward(case, host_shim.HostShimShuffledDeformConv2dKernels(2, 32, 0), True)
    assert chunked.input.tobytes() == whole.input.tobytes()
    assert_grads_close(chunked, case.reference_backward(), np.float64)


# The RoI ops, each with options where every bin of many overlapping rois samples a few pixels
# (sampling_ratio 0 / -1 is adaptive, which the per-op options below also cover).
CROWDED_ROI_OPTIONS = {
    "roi_align": dict(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True),
    "roi_align-max": dict(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=False, mode="max"),
    "ps_roi_align": dict(output_size=2, spatial_scale=1.0, sampling_ratio=0),
    "roi_pool": dict(output_size=2, spatial_scale=1.0),
    "ps_roi_pool": dict(output_size=2, spatial_scale=1.0),
    "deform_roi_pool": dict(output_size=2, spatial_scale=1.0, sampling_ratio=-1, gamma=0.3),
    "deform_psroi_pool": dict(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2,
                              trans_std=0.2, spatial_scale=1.0),
}


def crowded_roi_case(name, dtype=np.float32, seed=0) -> RoICase:
    """80 rois of 2..3.5 pixels around (3, 3) on a 6x6 image, so that the pixels there receive
    the gradients of every roi; deform ops with offsets / mask / trans."""
    op = name.split("-")[0]
    rng = np.random.default_rng(seed)
    k = 80
    options = dict(CROWDED_ROI_OPTIONS[name])
    pooled = options.get("pooled_size", options.get("output_size"))
    channels = {"ps_roi_align": 2 * pooled * pooled, "ps_roi_pool": 2 * pooled * pooled,
                "deform_psroi_pool": 2 * 4}.get(op, 3)
    if op == "deform_roi_pool":
        options.update(offset=rng.standard_normal((k, 2, pooled, pooled)).astype(dtype),
                       mask=rng.uniform(0.2, 1.5, (k, 1, pooled, pooled)).astype(dtype))
    if op == "deform_psroi_pool":
        options.update(trans=rng.standard_normal((k, 2 * 2, 2, 2)).astype(dtype))
    centre = rng.uniform(2.6, 3.4, (k, 2))
    half = rng.uniform(1.0, 1.75, (k, 2))
    rois = np.column_stack([np.zeros(k), centre - half, centre + half]).astype(dtype)
    case = RoICase(op, rng.standard_normal((1, channels, 6, 6)).astype(dtype), rois, options, None)
    grad_output = rng.standard_normal(case.forward(reference).shape).astype(dtype)
    return RoICase(op, case.input, rois, options, grad_output)


def _roi_backward(case, kernels, deterministic):
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: kernels):
        return case.backward(pydeform, deterministic=deterministic)


@pytest.mark.parametrize("name", CROWDED_ROI_OPTIONS)
def test_roi_shuffled_atomic_bits_change_deterministic_bits_do_not(name):
    case = crowded_roi_case(name)
    expected = case.backward(reference)

    def backward(kernels, deterministic):
        grads = _roi_backward(case, kernels, deterministic)
        assert_roi_grads_close(grads, expected, np.float32)
        return _bits(grads.values())

    assert len(shuffled_bits(host_shim.HostShimShuffledRoIKernels, backward)[True]) == 1


@settings(max_examples=25, deadline=None)
@given(data=st.data(), op=st.sampled_from(ROI_OPS), dtype=st.sampled_from((np.float32, np.float64)))
def test_roi_deterministic_matches_reference(data, op, dtype):
    """Every op and option of the strategy: boxes inside, across and outside the map, empty and
    huge ones, adaptive sampling, offset / mask / trans present or not."""
    case = data.draw(roi_cases(op=op, dtype=dtype, with_grad=True))
    grads = _roi_backward(case, host_shim.HostShimRoIKernels(), True)
    assert_roi_grads_close(grads, case.backward(reference), dtype)


def _listed_contributions(case, monkeypatch) -> tuple:
    """(the contributions the host shim's deterministic backward of ``case`` lists, the
    capacity a plan made ahead of the boxes reserves for them)."""
    from pydeform._contributions import roi_lists_plan
    from pydeform.backends.cupy_kernels import roi as cupy_roi
    from tests.roi_kernel_set_checks import recorded_call

    totals = []

    def counted_lists(*args):
        lists = real_lists(*args)
        totals.append(int(lists.bucket_ends[-1]) if lists.bucket_ends.size else 0)
        return lists

    real_lists = cupy_roi.contribution_lists
    monkeypatch.setattr(cupy_roi, "contribution_lists", counted_lists)
    _roi_backward(case, host_shim.HostShimRoIKernels(), True)
    _, args = recorded_call(lambda: case.backward(pydeform, deterministic=True))
    grad_output, input, params = args[0], args[1], args[-1]
    plan = roi_lists_plan("roi_pool", params, {"input": input.shape, "output": grad_output.shape}, input.dtype)
    return sum(totals), plan["contribution_item"][0][0]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ps_roi_pool_plans_room_for_every_contribution(data):
    """ps_roi_pool's deterministic backward can be planned ahead of the boxes (pydeform.jax on a
    GPU): K * (H + PH - 1) * (W + PW - 1) contributions at most, for boxes inside, across,
    outside and far beyond the map, and bins smaller than a pixel."""
    case = data.draw(roi_cases(op="ps_roi_pool", with_grad=True, min_rois=1, pooled_sizes=(1, 2, 3, 7)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        listed, planned = _listed_contributions(case, monkeypatch)
    assert listed <= planned


def test_ps_roi_pool_plan_is_reached(monkeypatch):
    """The bound is tight: 7 bins over a 6-pixel box overlap by a row (a column) at every inner
    edge, 12 rows in all."""
    rng = np.random.default_rng(0)
    rois = np.array([[0, 0.0, 0.0, 6.0, 6.0], [0, 0.2, -0.3, 6.4, 5.6]])
    case = RoICase("ps_roi_pool", rng.standard_normal((1, 49, 6, 6)), rois, dict(output_size=7),
                   rng.standard_normal((2, 1, 7, 7)))
    listed, planned = _listed_contributions(case, monkeypatch)
    assert listed == planned == 2 * 12 * 12


def test_numba_cuda_sets_launch_only_numba_kernels(monkeypatch):
    """The Numba CUDA kernel sets' deterministic backwards launch Numba CUDA kernels (lists,
    sort, gather; partials and parameter sums), never the CUDA C ones nor the atomic scatters. (They run, on the CUDA
    simulator, in tests/numba_cuda_simulator_checks.py.)"""
    from numba.cuda.dispatcher import CUDADispatcher

    from pydeform.backends.cupy_kernels import _compile
    from pydeform.backends.numba_kernels import contributions
    from pydeform.backends.numba_kernels import deform_conv as numba_deform_conv
    from pydeform.backends.numba_kernels import roi as numba_roi

    def no_cuda_c(*args):
        raise AssertionError("a CUDA C kernel was launched")

    launched = []

    def record(kernel, n_items, xp, *args):
        assert isinstance(kernel, CUDADispatcher), kernel
        launched.append(kernel)

    monkeypatch.setattr(_compile, "launch", no_cuda_c)
    monkeypatch.setattr(numba_deform_conv, "launch_cuda", record)
    monkeypatch.setattr(numba_roi, "launch_cuda", record)
    monkeypatch.setattr(deform_conv_module, "deform_conv2d_kernels",
                        lambda library, backend: numba_deform_conv.NumbaCudaDeformConv2dKernels(xp=np))
    case = crowded_deform_conv_case()
    deform_conv2d_backward(case.grad_output, **case.arguments(), deterministic=True)
    # The backward's im2col and col2im_coord, and the deterministic kernels in place of col2im.
    acc = np.dtype(np.float32)
    im2col, col2im_coord, _ = numba_deform_conv._cuda_kernels(acc)
    expected = {im2col, col2im_coord, contributions.sort_kernel(), *numba_deform_conv._cuda_deterministic_kernels(acc)}
    for name in CROWDED_ROI_OPTIONS:
        _roi_backward(crowded_roi_case(name), numba_roi.NumbaCudaRoIKernels(xp=np), True)
        expected.update(numba_roi.cuda_deterministic_kernels(name.split("-")[0].replace("ps_", ""), acc))
    expected.discard(None)
    assert set(launched) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "numba"])
def test_gpu_deterministic_bits_across_runs_and_grid_sizes(monkeypatch, backend):
    """On a GPU: the deterministic backwards (the CUDA C kernels, and the Numba CUDA kernels with
    backend="numba") give the same bits in repeated runs and with the grid capped at 1 and 7
    blocks, and agree with the reference. (CPU twins: the shuffled-shim tests above, and the
    Numba CUDA simulator's in tests/numba_cuda_simulator_checks.py.)"""
    import cupy

    from pydeform.backends.cupy_kernels import _compile
    from pydeform.backends.numba_kernels import targets

    cases = [(crowded_deform_conv_case(), None)] + [(crowded_roi_case(name), name) for name in CROWDED_ROI_OPTIONS]
    for case, name in cases:
        on_gpu = case.map_arrays(cupy.asarray)
        runs = []
        for max_blocks in (_compile.MAX_BLOCKS, _compile.MAX_BLOCKS, 1, 7):
            monkeypatch.setattr(_compile, "MAX_BLOCKS", max_blocks)
            monkeypatch.setattr(targets, "MAX_BLOCKS", max_blocks)
            if name is None:
                grads = deform_conv2d_backward(on_gpu.grad_output, **on_gpu.arguments(), backend=backend,
                                               deterministic=True)
                runs.append(_bits(None if g is None else cupy.asnumpy(g) for g in grads))
            else:
                grads = on_gpu.backward(pydeform, backend=backend, deterministic=True)
                runs.append(_bits(None if g is None else cupy.asnumpy(g) for g in grads.values()))
        assert len(set(runs)) == 1, name
        if name is None:
            assert_grads_close(grads, case.reference_backward(), np.float32)
        else:
            assert_roi_grads_close(grads, case.backward(reference), np.float32)


def test_numba_cpu_backward_bits_do_not_depend_on_the_thread_count():
    """The Numba CPU backwards are the deterministic mode on the CPU: the same bits with one
    thread and with every thread, in either mode."""
    import numba

    deform_case = crowded_deform_conv_case()
    roi_case = crowded_roi_case("deform_roi_pool")
    previous = numba.get_num_threads()
    bits = set()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for deterministic in (False, True):
                grads = deform_conv2d_backward(deform_case.grad_output, **deform_case.arguments(),
                                               deterministic=deterministic)
                roi_grads = roi_case.backward(pydeform, deterministic=deterministic)
                bits.add((_bits(grads), _bits(roi_grads.values())))
    finally:
        numba.set_num_threads(previous)
    assert len(bits) == 1
