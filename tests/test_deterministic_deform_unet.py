"""The deterministic mode (``deterministic=True``) of the Deformable U-Net ops' scatters, checked
on the CPU: deform_conv_transpose2d's forward (deform_conv2d's col2im splat) and deform_pool2d's
input gradient (avg and max).

As in tests/test_deterministic_backward.py, the CUDA C kernels run on the host shim's
shuffled-threads model: on inputs where many samples meet at a few pixels, the atomic scatter's
float32 bits change from shuffle to shuffle (asserted, so the model can tell), while the
deterministic one's never do, for every order, grid size and block size; both agree with the
float64 reference.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
import pydeform.deform_conv as deform_conv_module
from pydeform._workspace import provided
from pydeform import deform_unet as deform_unet_module
from tests import host_shim
from tests.deform_unet_cases import (
    deform_conv_transpose_cases, deform_pool_cases, pool_case_from, transpose_case_from,
)
from tests.deform_unet_kernel_set_checks import assert_dict_close, kernel_sets
from tests.strategies import assert_close
from tests.test_jax_workspace import buffers_for
from tests.test_deterministic_backward import _bits, crowded_deform_conv_case, shuffled_bits

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

MODES = ("avg", "max")


def crowded_transpose_case(dtype=np.float32):
    """The adjoint of the crowded deform_conv2d case: every input pixel splats within a pixel of
    (2.3, 2.6), so each of those corner pixels receives hundreds of contributions per channel."""
    return transpose_case_from(crowded_deform_conv_case(dtype), np.random.default_rng(5))


def crowded_pool_case(mode, dtype=np.float32):
    """The crowded deform_conv2d case's samples pooled: in either mode the input gradient of
    the pixels around (2.3, 2.6) gathers hundreds of contributions per channel."""
    return pool_case_from(crowded_deform_conv_case(dtype), mode, np.random.default_rng(6))


def _transpose_forward(case, kernels, deterministic):
    with kernel_sets(conv=kernels):
        return pydeform.deform_conv_transpose2d(**case.arguments(), deterministic=deterministic)


def _pool_backward(case, kernels, deterministic, **options):
    with kernel_sets(pool=kernels):
        return pydeform.deform_pool2d_backward(case.grad_output, **case.arguments(), deterministic=deterministic,
                                               **options)


def test_transpose_shuffled_atomic_bits_change_deterministic_bits_do_not():
    case = crowded_transpose_case()
    expected = case.reference_forward()

    def forward(kernels, deterministic):
        out = _transpose_forward(case, kernels, deterministic)
        assert_close("output", out, expected, np.float32)
        return out.tobytes()

    bits = shuffled_bits(host_shim.HostShimShuffledDeformConv2dKernels, forward)
    assert len(bits[True]) == 1


@pytest.mark.parametrize("mode", MODES)
def test_pool_shuffled_atomic_bits_change_deterministic_bits_do_not(mode):
    case = crowded_pool_case(mode)
    expected = case.reference_backward()

    def backward(kernels, deterministic):
        grads = _pool_backward(case, kernels, deterministic)
        assert_dict_close(grads, expected, np.float32)
        return _bits(grads)

    bits = shuffled_bits(host_shim.HostShimShuffledDeformPool2dKernels, backward)
    assert len(bits[True]) == 1
    # The offset and mask gradients have no scatter: the same in both modes.
    (deterministic_bits,) = bits[True]
    assert all(bits_[1:] == deterministic_bits[1:] for bits_ in bits[False])


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from((np.float32, np.float64)).flatmap(lambda d: deform_conv_transpose_cases(dtype=d)))
def test_transpose_deterministic_matches_reference(case):
    """All shapes of the strategy (empty batches, groups, offset groups, splats outside)."""
    out = _transpose_forward(case, host_shim.HostShimDeformConv2dKernels(), True)
    assert_close("output", out, case.reference_forward(), case.input.dtype)


@settings(max_examples=20, deadline=None)
@given(case=st.sampled_from((np.float32, np.float64)).flatmap(
    lambda d: deform_pool_cases(dtype=d, with_grad=True)))
def test_pool_deterministic_matches_reference(case):
    """Both modes, with and without the forward's indices."""
    kernels = host_shim.HostShimDeformPool2dKernels()
    expected = case.reference_backward()
    assert_dict_close(_pool_backward(case, kernels, True), expected, case.input.dtype)
    if case.mode == "max":
        with kernel_sets(pool=kernels):
            _, indices = pydeform.deform_pool2d(**case.arguments(), return_indices=True)
        assert_dict_close(_pool_backward(case, kernels, True, indices=indices), expected, case.input.dtype)


def test_transpose_deterministic_in_batch_chunks(monkeypatch):
    """Chunks of one image: each chunk's lists cover its own images, the bits are those of one
    chunk (the sums do not cross images)."""
    case = crowded_transpose_case(np.float64)
    whole = _transpose_forward(case, host_shim.HostShimDeformConv2dKernels(), True)
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", 1)
    chunked = _transpose_forward(case, host_shim.HostShimShuffledDeformConv2dKernels(2, 32, 0), True)
    assert chunked.tobytes() == whole.tobytes()


def test_numba_cuda_pool_set_launches_only_numba_kernels(monkeypatch):
    """The Numba CUDA deform_pool2d set's deterministic input gradient launches Numba CUDA kernels
    only: deform_conv2d's contribution lists (count, then fill), their sort and the pool's own
    gather, and no CUDA C kernel. (What they compute: the simulator checks in
    tests/numba_cuda_simulator_deform_unet_checks.py.)"""
    import pydeform.backends.cupy_kernels._compile as cupy_compile
    import pydeform.backends.cupy_kernels.deform_conv as cupy_deform_conv
    import pydeform.backends.cupy_kernels.deform_pool as cupy_deform_pool
    from pydeform.backends.numba_kernels import contributions
    from pydeform.backends.numba_kernels import deform_conv as numba_deform_conv
    from pydeform.backends.numba_kernels import deform_pool as numba_deform_pool

    launched = []

    def record(kernel, n_items, xp, *args):
        launched.append(kernel)

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA C kernel was launched")

    for module in (numba_deform_conv, numba_deform_pool):
        monkeypatch.setattr(module, "launch_cuda", record)
    for module in (cupy_compile, cupy_deform_conv, cupy_deform_pool):
        monkeypatch.setattr(module, "launch", refuse)
    acc = np.dtype(np.float32)
    lists = numba_deform_conv._cuda_deterministic_kernels(acc)[0]
    expected = [lists, lists, contributions.sort_kernel(), numba_deform_pool._cuda_gather_kernel(acc)]
    kernels = numba_deform_pool.NumbaCudaDeformPool2dKernels(xp=np)
    for mode in MODES:
        case = crowded_pool_case(mode)
        geometry = deform_unet_module.deform_pool2d_geometry(
            {"input": case.input.shape, "offset": case.offset.shape}, case.kernel_size, case.stride, case.padding,
            case.dilation)
        indices = np.zeros(case.grad_output.shape, np.int32) if mode == "max" else None
        launched.clear()
        kernels.backward_input_deterministic(case.offset, case.mask, case.grad_output, indices,
                                             np.zeros(case.input.shape, acc), geometry, mode == "max")
        assert launched == expected


def test_numba_cpu_bits_do_not_depend_on_the_thread_count_or_the_mode():
    """On the CPU both scatters are deterministic already: the same bits with one thread and
    with every thread, with deterministic False or True."""
    import numba

    transpose_case = crowded_transpose_case()
    pool_cases = [crowded_pool_case(mode) for mode in MODES]
    previous = numba.get_num_threads()
    bits = set()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for deterministic in (False, True):
                out = pydeform.deform_conv_transpose2d(**transpose_case.arguments(), deterministic=deterministic)
                pooled = [pydeform.deform_pool2d_backward(case.grad_output, **case.arguments(),
                                                          deterministic=deterministic) for case in pool_cases]
                bits.add((out.tobytes(), *(_bits(grads) for grads in pooled)))
    finally:
        numba.set_num_threads(previous)
    assert len(bits) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaN fill of integer slots
@pytest.mark.parametrize("column_bytes", [deform_conv_module.COLUMN_BUFFER_BYTES, 1])
def test_deterministic_plans_hold_every_scratch_buffer(monkeypatch, column_bytes):
    """With exactly the buffers the workspace plans name (what pydeform.jax provides), the
    deterministic transpose forward and pool backward of the CUDA C kernel sets run and give the
    bits they give with buffers of their own."""
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", column_bytes)
    case = crowded_transpose_case()
    conv_kernels = host_shim.HostShimDeformConv2dKernels()
    expected = _transpose_forward(case, conv_kernels, True)
    geometry = deform_unet_module.deform_conv_transpose2d_geometry(
        {name: getattr(case, name).shape for name in ("input", "offset", "weight", "mask")}, *case.options().values())
    plan = deform_unet_module.deform_conv_transpose2d_workspace(
        conv_kernels, case.input.shape[0], geometry, case.input.dtype, backward=False, masked=True, deterministic=True)
    assert "bucket_ends" in plan
    with provided(buffers_for({"output": (expected.shape, expected.dtype)}, plan)):
        assert _transpose_forward(case, conv_kernels, True).tobytes() == expected.tobytes()
    pool_kernels = host_shim.HostShimDeformPool2dKernels()
    for mode in MODES:
        case = crowded_pool_case(mode)
        expected = _pool_backward(case, pool_kernels, True)
        geometry = deform_unet_module.deform_pool2d_geometry(
            {"input": case.input.shape, "offset": case.offset.shape, "mask": case.mask.shape},
            case.kernel_size, case.stride, case.padding, case.dilation)
        plan = deform_unet_module.deform_pool2d_workspace(
            pool_kernels, case.input.shape[0], geometry, case.input.dtype, backward=True, masked=True,
            recompute_indices=mode == "max", deterministic=True)
        outputs = {f"grad_{name}": (getattr(case, name).shape, case.input.dtype) for name in ("input", "offset", "mask")}
        with provided(buffers_for(outputs, plan)):
            assert _bits(_pool_backward(case, pool_kernels, True)) == _bits(expected)


def test_deterministic_must_be_a_bool():
    transpose, pool = crowded_transpose_case(), crowded_pool_case("avg")
    with pytest.raises(TypeError, match="deterministic"):
        pydeform.deform_conv_transpose2d(**transpose.arguments(), deterministic=1)
    with pytest.raises(TypeError, match="deterministic"):
        pydeform.deform_pool2d_backward(pool.grad_output, **pool.arguments(), deterministic="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "numba"])
def test_gpu_deterministic_bits_across_runs_and_grid_sizes(monkeypatch, backend):
    """On a GPU: the deterministic transpose forward and pool backward give the same bits in
    repeated runs and with the grid capped at 1 and 7 blocks, and agree with the reference.
    (CPU twins: the shuffled-shim tests above.)"""
    import cupy

    from pydeform.backends.cupy_kernels import _compile

    transpose_case = crowded_transpose_case()
    on_gpu = transpose_case.map_arrays(cupy.asarray)
    pool_cases = [(case, case.map_arrays(cupy.asarray)) for case in map(crowded_pool_case, MODES)]
    runs = []
    for max_blocks in (_compile.MAX_BLOCKS, _compile.MAX_BLOCKS, 1, 7):
        monkeypatch.setattr(_compile, "MAX_BLOCKS", max_blocks)
        out = cupy.asnumpy(pydeform.deform_conv_transpose2d(**on_gpu.arguments(), backend=backend,
                                                            deterministic=True))
        pooled = []
        for case, device_case in pool_cases:
            grads = pydeform.deform_pool2d_backward(device_case.grad_output, **device_case.arguments(),
                                                    backend=backend, deterministic=True)
            grads = type(grads)(*(None if g is None else cupy.asnumpy(g) for g in grads))
            assert_dict_close(grads, case.reference_backward(), np.float32)
            pooled.append(_bits(grads))
        assert_close("output", out, transpose_case.reference_forward(), np.float32)
        runs.append((out.tobytes(), *pooled))
    assert len(set(runs)) == 1
