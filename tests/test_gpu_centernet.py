"""CenterNet on a CUDA GPU: both GPU backends (CuPy RawKernels with ``backend=None``, Numba CUDA
with ``backend="numba"``) on CuPy arrays against the float64 reference for every GPU dtype, the
kernel sets called directly with NaN-poisoned outputs, the CuPy decode against the PyTorch decode
(max_pool2d, eq, topk, gather) and its launch count.

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py); the same kernels run
on the CPU host shim in test_cuda_host_shim_centernet.py. CuPy and torch are imported inside the
tests, so this module imports on any machine.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from pydeform import centernet as centernet_module
from pydeform.backends import centernet_kernels
from pydeform.backends.cupy_kernels import centernet as cupy_centernet
from pydeform.benchmark_cases import torch_centernet_decode
from tests.centernet_cases import (
    DecodeCase,
    assert_detections_match,
    assert_focal_matches,
    assert_targets_match,
    build_decode_case,
    build_focal_case,
    build_targets_case,
    check_decode_kernel,
    check_focal_kernels,
    check_targets_kernel,
    decode_cases,
    targets_cases,
)
from tests.strategies import to_numpy
from tests.test_cuda_host_shim_centernet import selection_cases
# The backends and dtypes, the CuPy helpers of the deform_conv2d GPU tests.
from tests.test_gpu_deform_conv import BACKENDS, DTYPES, assert_on_gpu_like, to_gpu

pytestmark = pytest.mark.gpu

FLOAT_DTYPES = {name: DTYPES[name] for name in ("float32", "float64")}


def accumulation(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def cupy_tiles(tile):
    """The public ops on CuPy arrays run the CuPy kernels with decode tiles of ``tile``."""
    kernels = cupy_centernet.CupyCenterNetKernels(tile)
    return mock.patch.object(centernet_module, "centernet_kernels", lambda library, backend: kernels)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_decode_matches_reference(backend, dtype, data):
    case = data.draw(decode_cases(dtype))
    gpu = to_gpu(case)
    got = gpu.run(pydeform, backend=backend)
    assert_on_gpu_like(got, gpu.heat.astype(accumulation(dtype)), "detections")
    assert_detections_match(got, case.reference(), dtype)
    for name in ("heat", "wh", "reg"):
        if getattr(case, name) is not None:
            np.testing.assert_array_equal(to_numpy(getattr(gpu, name)), getattr(case, name), err_msg=name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@settings(max_examples=20)
@given(data=st.data(), tile=st.sampled_from([1, 5, 16, 256]))
def test_decode_with_small_tiles_matches_reference(dtype, data, tile):
    """Every small heatmap spans many tiles: candidate lists and the selection across them."""
    case = data.draw(decode_cases(dtype))
    with cupy_tiles(tile):
        got = to_gpu(case).run(pydeform)
    assert_detections_match(got, case.reference(), dtype)


@pytest.mark.parametrize("name", selection_cases().keys())
def test_decode_selection_paths(name):
    """The sampled-subset and survivor-overflow paths of the per-image selection on the device."""
    case, tile = selection_cases()[name]
    with cupy_tiles(tile):
        got = to_gpu(case).run(pydeform)
    assert_detections_match(got, case.reference(), np.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.keys())
@pytest.mark.parametrize("K", [1, 7, 40, 130])
def test_kernel_sets_write_every_element(backend, dtype, K):
    rng = np.random.default_rng(K)
    kernels = centernet_kernels("cupy", backend)
    check_decode_kernel(kernels, build_decode_case(rng, dtype, 2, 3, (5, 8), K, nan_fraction=0.1, cat_spec_wh=True,
                                                   threshold=0.5))
    check_focal_kernels(kernels, build_focal_case(rng, dtype, (2, 2, 70, 70)))
    if dtype in FLOAT_DTYPES.values():
        check_targets_kernel(kernels, build_targets_case(rng, dtype, batch=2, objects=9, max_objects=7))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
def test_decode_of_the_benchmark_shape(dtype):
    """B=8, 80 classes, 128x128, K=100 (docs/benchmarks.md) of random scores (many peaks; ties are rare), and
    K beyond the selection's shared arrays; both backends, the second call repeating the first bit
    for bit."""
    import cupy

    rng = np.random.default_rng(1)
    heat = rng.random((8, 80, 128, 128)).astype(dtype)
    wh = rng.uniform(2, 64, (8, 2, 128, 128)).astype(dtype)
    reg = rng.random((8, 2, 128, 128)).astype(dtype)
    for K in (100, 3000):
        case = DecodeCase(heat, wh, reg, K, down_ratio=4.0)
        expected = case.reference()
        gpu = to_gpu(case)
        for backend in BACKENDS.values():
            first = gpu.run(pydeform, backend=backend)
            cupy.testing.assert_array_equal(gpu.run(pydeform, backend=backend), first)
            assert_detections_match(first, expected, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@settings(max_examples=20)
@given(data=st.data())
def test_targets_match_reference(backend, dtype, data):
    import cupy

    case = data.draw(targets_cases(dtype))
    gpu = dataclasses.replace(case, boxes=cupy.asarray(case.boxes), labels=cupy.asarray(case.labels))
    got = gpu.run(pydeform, backend=backend)
    assert_on_gpu_like(got.heatmap, gpu.boxes, "heatmap")
    assert_targets_match(got, case.reference(), dtype)
    np.testing.assert_array_equal(to_numpy(gpu.boxes), case.boxes, err_msg="boxes were modified")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), positives=st.integers(0, 4),
       shape=st.sampled_from([(2, 3, 4, 5), (1, 1, 1, 1), (2, 80, 32, 32)]))
def test_focal_loss_matches_reference(backend, dtype, seed, positives, shape):
    import cupy

    case = build_focal_case(np.random.default_rng(seed), dtype, shape, positives=positives)
    gpu = case.map_arrays(cupy.asarray)
    loss, grad = gpu.loss(pydeform, backend=backend), gpu.grad(pydeform, backend=backend)
    assert_on_gpu_like(grad, gpu.pred, "grad_pred")
    assert_focal_matches(to_numpy(loss), to_numpy(grad), case, dtype)


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_focal_loss_is_deterministic(backend):
    """Many block partial sums (8 x 80 x 128 x 128 elements), the same bits on every run."""
    import cupy

    case = build_focal_case(np.random.default_rng(2), np.float32, (8, 80, 128, 128), positives=160)
    gpu = case.map_arrays(cupy.asarray)
    losses = {to_numpy(gpu.loss(pydeform, backend=backend)).tobytes() for _ in range(5)}
    assert len(losses) == 1
    assert_focal_matches(to_numpy(gpu.loss(pydeform, backend=backend)), to_numpy(gpu.grad(pydeform, backend=backend)),
                         case, np.float32)


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA or sees no GPU")
    return torch


@pytest.mark.parametrize("shape, K", [((2, 4, 32, 32), 50), ((8, 80, 128, 128), 100)])
def test_decode_matches_the_pytorch_decode(torch_cuda, shape, K):
    """float32 random scores (distinct, so torch.topk's unordered ties cannot differ): the same
    classes and scores, boxes to float32 tolerance."""
    import cupy

    torch = torch_cuda
    rng = np.random.default_rng(4)
    batch, _, height, width = shape
    heat = rng.random(shape).astype(np.float32)
    wh = rng.uniform(2, 64, (batch, 2, height, width)).astype(np.float32)
    reg = rng.random((batch, 2, height, width)).astype(np.float32)
    got = to_numpy(pydeform.centernet_decode(cupy.asarray(heat), cupy.asarray(wh), cupy.asarray(reg), K))
    tensors = [torch.from_numpy(a).cuda() for a in (heat, wh, reg)]
    expected = torch_centernet_decode(*tensors, K).cpu().numpy().astype(np.float64)
    np.testing.assert_array_equal(got[..., 5], expected[..., 5])
    np.testing.assert_array_equal(got[..., 4], expected[..., 4])
    np.testing.assert_allclose(got[..., :4], expected[..., :4], rtol=1e-6, atol=1e-4)


def test_decode_is_two_launches():
    """The CuPy decode launches exactly its two kernels, and nothing else reaches the device: with
    torch's CUDA profiler (CUPTI sees every kernel of the process) when torch has CUDA."""
    import cupy

    rng = np.random.default_rng(5)
    heat = cupy.asarray(rng.random((2, 80, 64, 64)).astype(np.float32))
    wh = cupy.asarray(rng.uniform(2, 64, (2, 2, 64, 64)).astype(np.float32))
    pydeform.centernet_decode(heat, wh, None, 100)  # compile first
    cupy.cuda.Device().synchronize()
    launched = []
    real_launch = cupy_centernet.launch_blocks

    def counting_launch(manifest, template, *args):
        launched.append(template)
        return real_launch(manifest, template, *args)

    with mock.patch.object(cupy_centernet, "launch_blocks", counting_launch):
        pydeform.centernet_decode(heat, wh, None, 100)
    assert launched == ["centernet_decode_candidates", "centernet_decode_detections"]

    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        pydeform.centernet_decode(heat, wh, None, 100)
        cupy.cuda.Device().synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and "centernet" in event.name]
    others = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA
              and "centernet" not in event.name and "Memcpy" not in event.name and "Memset" not in event.name]
    assert len(kernels) == 2, kernels
    assert not others, others


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_empty_batch_and_zero_k(backend):
    import cupy

    heat = cupy.zeros((0, 3, 4, 5), np.float32)
    wh = cupy.zeros((0, 2, 4, 5), np.float32)
    assert pydeform.centernet_decode(heat, wh, None, 7, backend=backend).shape == (0, 7, 6)
    heat = cupy.ones((2, 3, 4, 5), np.float32)
    wh = cupy.ones((2, 2, 4, 5), np.float32)
    out = pydeform.centernet_decode(heat, wh, None, 0, backend=backend)
    assert out.shape == (2, 0, 6) and isinstance(out, cupy.ndarray)
