"""The level-set ops on a CUDA GPU: both GPU backends (CuPy RawKernels with ``backend="cupy"``,
Numba CUDA with ``backend="numba"``) on CuPy arrays against the Numba CPU kernels (bit for bit
for the snakes; Chan-Vese allclose with the same segmentation and iteration count),
scikit-image's ported cases, the batched form against a loop, unchanged inputs, the sums
bit-identical run to run, and cuCIM where it is installed.

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py); the same CUDA C
kernels run on the CPU host shim in test_cuda_host_shim_levelset.py. CuPy is imported inside the
tests, so this module imports on any machine.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydeform import levelset
from tests.levelset_cases import (
    CHAN_VESE_CASES,
    SNAKE_CASES,
    draw_init,
    skimage_acwe,
    skimage_gac,
)

pytestmark = pytest.mark.gpu

BACKENDS = ["cupy", "numba"]
SHAPES = [(2, 2), (3, 5), (17, 40), (2, 2, 2), (3, 3, 3), (5, 6, 7)]


def to_gpu(value):
    import cupy

    return cupy.asarray(value) if isinstance(value, np.ndarray) else value


def to_host(value):
    """NumPy arrays for the CuPy arrays in ``value`` (a tuple / ChanVeseResult too)."""
    import cupy

    if isinstance(value, cupy.ndarray):
        return cupy.asnumpy(value)
    if isinstance(value, tuple):
        return type(value)(*(to_host(v) for v in value)) if hasattr(value, "_fields") else \
            tuple(to_host(v) for v in value)
    return value


def on_gpu(backend):
    """The level-set ops (the namespace tests/levelset_cases.py runs) taking and returning NumPy
    arrays, run on the GPU with ``backend``: arrays go to the GPU and the results come back,
    callbacks see NumPy copies."""

    def wrap(op, with_backend=True):
        def call(*args, **kwargs):
            if "iter_callback" in kwargs:
                callback = kwargs["iter_callback"]
                kwargs["iter_callback"] = lambda u: callback(to_host(u))
            args = [to_gpu(a) for a in args]
            kwargs = {k: to_gpu(v) for k, v in kwargs.items()}
            if with_backend:
                kwargs["backend"] = backend
            return to_host(op(*args, **kwargs))

        return call

    return types.SimpleNamespace(
        morphological_chan_vese=wrap(levelset.morphological_chan_vese),
        morphological_geodesic_active_contour=wrap(levelset.morphological_geodesic_active_contour),
        chan_vese=wrap(levelset.chan_vese),
        inverse_gaussian_gradient=wrap(levelset.inverse_gaussian_gradient, with_backend=False),
        disk_level_set=levelset.disk_level_set,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SNAKE_CASES + CHAN_VESE_CASES, ids=lambda c: c.__name__)
def test_scikit_image_cases(case, backend):
    case(on_gpu(backend))


@settings(max_examples=20)
@given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1))
def test_curvature_operators_equal_the_cpu(shape, seed):
    import cupy

    u = (np.random.default_rng(seed).random(shape) < 0.5).astype(np.int8)
    for op in (levelset.sup_inf, levelset.inf_sup):
        np.testing.assert_array_equal(cupy.asnumpy(op(cupy.asarray(u))), op(u))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1), st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([(1, 1), (2.5, 1)]), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_acwe_equals_the_cpu(backend, shape, smoothing, phase, init, lambdas, num_iter, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    init = draw_init(init, shape, rng)
    calls = []
    ours = on_gpu(backend).morphological_chan_vese(image, num_iter, init, smoothing, *lambdas,
                                                   iter_callback=calls.append, phase=phase)
    np.testing.assert_array_equal(ours, levelset.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas,
                                                                         phase=phase))
    assert ours.dtype == np.int8 and len(calls) == num_iter + 1


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1), st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([-1, 0, 1, 2.5]), st.sampled_from(["auto", 0.3]), st.integers(0, 4),
       st.integers(0, 2**32 - 1))
def test_gac_equals_the_cpu(backend, shape, smoothing, phase, init, balloon, threshold, num_iter, seed):
    rng = np.random.default_rng(seed)
    gimage = rng.random(shape) * rng.choice([1.0, 1e-3, 1e3])
    init = draw_init(init, shape, rng)
    ours = on_gpu(backend).morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold,
                                                                 balloon, phase=phase)
    np.testing.assert_array_equal(ours, levelset.morphological_geodesic_active_contour(
        gimage, num_iter, init, smoothing, threshold, balloon, phase=phase))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["checkerboard", "disk", "small disk"])
def test_chan_vese_equals_the_cpu(backend, init):
    image = np.random.default_rng(3).random((37, 45)) + np.indices((37, 45)).sum(0) / 40.0
    seg, phi, energies = on_gpu(backend).chan_vese(image, init_level_set=init, extended_output=True)
    seg_cpu, phi_cpu, energies_cpu = levelset.chan_vese(image, init_level_set=init, extended_output=True)
    assert len(energies) == len(energies_cpu)
    # the sums run in another order (and FMAs round otherwise) than on the CPU; many steps amplify that
    np.testing.assert_allclose(phi, phi_cpu, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(seg, seg_cpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_runs_equal_scikit_image(backend):
    """Several chunks of rows per image in the sums; a 3-D run."""
    rng = np.random.default_rng(7)
    gimage = levelset.inverse_gaussian_gradient(rng.random((130, 300)), alpha=50, sigma=2)
    runs = [
        (skimage_acwe, "morphological_chan_vese", rng.integers(0, 256, (130, 300)), dict(smoothing=3, phase=1)),
        (skimage_gac, "morphological_geodesic_active_contour", gimage, dict(balloon=-1, smoothing=2)),
        (skimage_acwe, "morphological_chan_vese", rng.integers(0, 9, (20, 21, 22)), dict(smoothing=2)),
    ]
    for skimage_op, name, image, options in runs:
        ours = getattr(on_gpu(backend), name)(image, 12, **options)
        np.testing.assert_array_equal(ours, skimage_op(image, 12, **options), err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 20, 33), (2, 6, 7, 8)])
def test_batched_equals_a_loop_and_inputs_are_unchanged(backend, shape):
    import cupy

    rng = np.random.default_rng(4)
    images, gimages, init = (cupy.asarray(a) for a in (rng.integers(0, 256, shape).astype(np.float64),
                                                          rng.random(shape), rng.standard_normal(shape)))
    copies = [a.copy() for a in (images, gimages, init)]
    acwe = levelset.morphological_chan_vese(images, 3, init, 2, phase=1, batched=True, backend=backend)
    gac = levelset.morphological_geodesic_active_contour(gimages, 3, init, 1, balloon=-1, batched=True,
                                                         backend=backend)
    for b in range(shape[0]):
        cupy.testing.assert_array_equal(acwe[b], levelset.morphological_chan_vese(images[b], 3, init[b], 2, phase=1,
                                                                                  backend=backend))
        cupy.testing.assert_array_equal(gac[b], levelset.morphological_geodesic_active_contour(
            gimages[b], 3, init[b], 1, balloon=-1, backend=backend))
    if len(shape) == 3:
        seg, phi, energies = levelset.chan_vese(gimages, max_num_iter=50, init_level_set=init, extended_output=True,
                                                batched=True, backend=backend)
        for b in range(shape[0]):
            seg_b, phi_b, energies_b = levelset.chan_vese(gimages[b], max_num_iter=50, init_level_set=init[b],
                                                          extended_output=True, backend=backend)
            cupy.testing.assert_allclose(phi[b], phi_b, rtol=1e-12, atol=1e-14)
            cupy.testing.assert_array_equal(seg[b], seg_b)
            assert len(energies[b]) == len(energies_b)
    for array, copy in zip((images, gimages, init), copies):
        cupy.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_bit_identical_run_to_run(backend):
    import cupy

    rng = np.random.default_rng(5)
    image = cupy.asarray(rng.random((300, 700)))
    runs = [(levelset.morphological_chan_vese(image, 5, backend=backend),
             levelset.chan_vese(image, max_num_iter=30, extended_output=True, backend=backend).phi)
            for _ in range(2)]
    assert runs[0][0].tobytes() == runs[1][0].tobytes() and runs[0][1].tobytes() == runs[1][1].tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_cucim(backend):
    """cuCIM's GPU port of scikit-image on a real image: pydeform equals scikit-image exactly, so
    it agrees with cuCIM wherever cuCIM agrees with scikit-image (cuCIM's fused kernels may
    contract into FMAs); require nearly every pixel."""
    cucim_segmentation = pytest.importorskip("cucim.skimage.segmentation")
    import cupy
    from cucim.skimage.segmentation import morphsnakes as cucim_morphsnakes
    from skimage import data

    camera = data.camera()[::2, ::2].astype(np.float64)
    cucim_morphsnakes._curvop = cucim_morphsnakes._fcycle([
        lambda u, f, w: cucim_morphsnakes.sup_inf(cucim_morphsnakes.inf_sup(u, f, w), f, w),
        lambda u, f, w: cucim_morphsnakes.inf_sup(cucim_morphsnakes.sup_inf(u, f, w), f, w)])
    theirs = cupy.asnumpy(cucim_segmentation.morphological_chan_vese(cupy.asarray(camera), 20, smoothing=3))
    ours = on_gpu(backend).morphological_chan_vese(camera, 20, smoothing=3)
    np.testing.assert_array_equal(ours, skimage_acwe(camera, 20, smoothing=3))
    assert np.mean(ours == theirs) > 0.99
    seg_theirs = cupy.asnumpy(cucim_segmentation.chan_vese(cupy.asarray(camera), max_num_iter=50))
    seg_ours = on_gpu(backend).chan_vese(camera, max_num_iter=50)
    assert np.mean(seg_ours == seg_theirs) > 0.99
