"""The Numba CUDA level-set kernels run by Numba's CUDA simulator on host arrays, through the
public ops, against the float64 reference: the curvature operators, MorphACWE, MorphGAC (balloon
-1, 0, 1) and Chan-Vese in 2-D, 3-D and batched, both smoothing phases.

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1``. The simulator runs every CUDA thread as a
Python thread (and the reductions a block of 32 per image row), so the shapes are tiny and the
runs short.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from pydeform import levelset
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels.levelset import NumbaCudaLevelSetKernels
from reference import levelset as ref
from tests.levelset_cases import (
    case_chan_vese_bad_arguments,
    case_chan_vese_blank_image,
    case_chan_vese_flat_level_set,
    case_gac_11x11,
    case_init_level_sets,
    case_wrong_ndim,
)

if not simulator_enabled():
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_numba_cuda_simulator.py)")


@pytest.fixture(autouse=True)
def simulated_kernels():
    """The public ops, for NumPy arrays, run the Numba CUDA kernel set."""
    kernels = NumbaCudaLevelSetKernels(xp=np)
    with mock.patch.object(levelset, "levelset_kernels", lambda library, backend: kernels):
        yield


@pytest.mark.parametrize("shape", [(4, 5), (3, 3, 3)])
def test_curvature_operators(shape):
    rng = np.random.default_rng(0)
    for _ in range(2):
        u = (rng.random(shape) < 0.5).astype(np.int8)
        np.testing.assert_array_equal(levelset.sup_inf(u), ref.sup_inf(u))
        np.testing.assert_array_equal(levelset.inf_sup(u), ref.inf_sup(u))


@pytest.mark.parametrize("shape, init, smoothing, phase", [
    ((4, 5), "array", 2, 1),
    ((3, 3, 3), "disk", 1, 1),
    ((3, 4, 3), "array", 1, 0),
])
def test_acwe(shape, init, smoothing, phase):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape).astype(np.float64)
    init = rng.standard_normal(shape) if init == "array" else init
    calls = []
    ours = levelset.morphological_chan_vese(image, 2, init, smoothing, 2.5, 1, calls.append, phase=phase)
    expected, _ = ref.morphological_chan_vese(image, 2, init, smoothing, 2.5, 1, phase=phase)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.int8 and len(calls) == 3


def test_acwe_nan_pixel():
    image = np.random.default_rng(2).integers(0, 9, (4, 4)).astype(np.float64)
    image[1, 2] = np.nan
    np.testing.assert_array_equal(levelset.morphological_chan_vese(image, 2, "disk"),
                                  ref.morphological_chan_vese(image, 2, "disk")[0])


@pytest.mark.parametrize("shape", [(4, 4), (3, 3, 3)])
@pytest.mark.parametrize("balloon", [-1, 0, 1])
def test_gac(shape, balloon):
    rng = np.random.default_rng(3)
    gimage = rng.random(shape)
    init = rng.standard_normal(shape)
    ours = levelset.morphological_geodesic_active_contour(gimage, 2, init, 1, "auto", balloon, phase=1)
    expected, _ = ref.morphological_geodesic_active_contour(gimage, 2, init, 1, "auto", balloon, phase=1)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("shape", [(2, 4, 4), (2, 3, 3, 3)])
def test_batched_snakes_equal_the_reference_per_image(shape):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, shape).astype(np.float64)
    gimages = rng.random(shape)
    init = rng.standard_normal(shape)
    acwe = levelset.morphological_chan_vese(images, 2, init, 1, phase=1, batched=True)
    gac = levelset.morphological_geodesic_active_contour(gimages, 2, init, 1, balloon=-1, batched=True)
    for b in range(shape[0]):
        np.testing.assert_array_equal(acwe[b], ref.morphological_chan_vese(images[b], 2, init[b], 1, phase=1)[0])
        np.testing.assert_array_equal(gac[b], ref.morphological_geodesic_active_contour(gimages[b], 2, init[b], 1,
                                                                                         balloon=-1)[0])


def test_chan_vese():
    image = np.random.default_rng(5).random((4, 5))
    params = dict(mu=0.2, lambda1=1.5, dt=0.8, max_num_iter=3, extended_output=True)
    seg, phi, energies = levelset.chan_vese(image, **params)
    seg_ref, phi_ref, energies_ref = ref.chan_vese(image, **params)
    np.testing.assert_allclose(phi, phi_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(energies, energies_ref, rtol=1e-12)
    np.testing.assert_array_equal(seg, seg_ref)


def test_batched_chan_vese_stops_each_image_on_its_own():
    rng = np.random.default_rng(6)
    images = np.stack([np.kron(rng.random((2, 2)), np.ones((2, 2))), np.zeros((4, 4))])
    params = dict(tol=0.1, max_num_iter=6, init_level_set="disk", extended_output=True)
    seg, phi, energies = levelset.chan_vese(images, batched=True, **params)
    for b in range(2):
        seg_ref, phi_ref, energies_ref = ref.chan_vese(images[b], **params)
        np.testing.assert_array_equal(seg[b], seg_ref)
        np.testing.assert_allclose(phi[b], phi_ref, rtol=1e-12, atol=1e-14)
        assert len(energies[b]) == len(energies_ref)
    assert len(energies[0]) != len(energies[1])


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 3, 3, 3)])
def test_steps_write_every_interior_pixel_and_no_border(shape):
    """Each step of the kernel set, called directly into an output whose interior holds 7: the
    interior becomes the reference's level set, the zero border stays."""
    rng = np.random.default_rng(7)
    kernels = NumbaCudaLevelSetKernels(xp=np)
    padded = (shape[0], *(n + 2 for n in shape[1:]))
    inside = (slice(None),) + (slice(1, -1),) * (len(shape) - 1)
    u = np.zeros(padded, np.uint8)
    u[inside] = rng.random(shape) < 0.5
    image, gimage = rng.integers(0, 9, shape).astype(np.float64), rng.random(shape)
    means = np.empty((shape[0], 2))
    kernels.acwe_means(u, image, np.empty((int(np.prod(shape[:-1])), 4)), means)
    gradient = np.stack(np.gradient(gimage, axis=tuple(range(1, len(shape)))), axis=1)
    steps = {
        "sup_inf": (lambda dst: kernels.sup_inf(u, dst), lambda b, v: ref.sup_inf(v)),
        "inf_sup": (lambda dst: kernels.inf_sup(u, dst), lambda b, v: ref.inf_sup(v)),
        "acwe_attach": (lambda dst: kernels.acwe_attach(u, image, means, 1.0, 1.0, dst),
                        lambda b, v: ref.morphological_chan_vese(image[b], 1, v, 0)[0]),
        "gac_balloon": (lambda dst: kernels.gac_balloon(u, gimage, np.full(shape[0], -1.0), True, dst),
                        lambda b, v: ref.morphological_geodesic_active_contour(
                            np.ones(shape[1:]), 1, v, 0, threshold=-1.0, balloon=1)[0]),
        "gac_attach": (lambda dst: kernels.gac_attach(u, gradient, dst),
                       lambda b, v: ref.morphological_geodesic_active_contour(gimage[b], 1, v, 0)[0]),
    }
    for name, (step, expected) in steps.items():
        dst = np.zeros(padded, np.uint8)
        dst[inside] = 7
        step(dst)
        for b in range(shape[0]):
            np.testing.assert_array_equal(dst[b][inside[1:]], expected(b, u[b][inside[1:]]), err_msg=name)
        dst[inside] = 0
        assert not dst.any(), f"{name} wrote the border"


# scikit-image's ported cases that stay short here; the others (the black image, the blob from two
# radii and the 3-D zero image: 6, 20 and 5 MorphACWE iterations of 11x11 / 7x7x7, 10-25 s each,
# and the Chan-Vese runs of 100 to 500 iterations) run on the host shim and the GPU.
@pytest.mark.parametrize("case", [case_gac_11x11, case_init_level_sets, case_wrong_ndim,
                                  case_chan_vese_flat_level_set, case_chan_vese_bad_arguments,
                                  case_chan_vese_blank_image], ids=lambda c: c.__name__)
def test_scikit_image_cases(case):
    case(levelset)


def test_2x2_images_callbacks_and_unchanged_inputs():
    rng = np.random.default_rng(8)
    image, init = rng.integers(0, 9, (2, 2)).astype(np.float64), rng.standard_normal((2, 2))
    copies = image.copy(), init.copy()
    acwe_calls, gac_calls = [], []
    acwe = levelset.morphological_chan_vese(image, 2, init, 1, iter_callback=acwe_calls.append)
    gac = levelset.morphological_geodesic_active_contour(image, 2, init, 1, "auto", 1, gac_calls.append, phase=1)
    seg, phi, _ = levelset.chan_vese(image, max_num_iter=2, init_level_set=init, extended_output=True)
    np.testing.assert_array_equal(acwe, ref.morphological_chan_vese(image, 2, init, 1)[0])
    np.testing.assert_array_equal(gac, ref.morphological_geodesic_active_contour(image, 2, init, 1, "auto", 1,
                                                                                 phase=1)[0])
    np.testing.assert_allclose(phi, ref.chan_vese(image, max_num_iter=2, init_level_set=init,
                                                  extended_output=True)[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(levelset.sup_inf(init), ref.sup_inf(init))
    assert len(acwe_calls) == len(gac_calls) == 3
    np.testing.assert_array_equal(image, copies[0])
    np.testing.assert_array_equal(init, copies[1])
