"""Shared level-set test material: scikit-image as the oracle (with the smoothing phase it keeps
in module state set explicitly), and scikit-image's own morphsnakes / chan_vese test cases,
written once against an implementation ``impl`` (a namespace with ``morphological_chan_vese``,
``morphological_geodesic_active_contour``, ``chan_vese``, ``disk_level_set``,
``inverse_gaussian_gradient``) so that every backend runs them; and :func:`kernels_named`, which
points the ops at the Numba CPU or the host-shim kernels."""

import contextlib
from unittest import mock

import numpy as np
import pytest

from pydeform.selftest.levelset import CHECKERBOARD_6X6, DISK_6X6, GAC_11X11_REFERENCE, gaussian_blob

skimage_segmentation = pytest.importorskip("skimage.segmentation")
from skimage.segmentation import morphsnakes  # noqa: E402


def set_skimage_phase(phase):
    """Start scikit-image's module-level smoothing cycle at ``phase`` (0: SI(IS(.)) first)."""
    operators = [lambda u: morphsnakes.sup_inf(morphsnakes.inf_sup(u)),
                 lambda u: morphsnakes.inf_sup(morphsnakes.sup_inf(u))]
    morphsnakes._curvop = morphsnakes._fcycle(operators[phase:] + operators[:phase])


def skimage_acwe(image, num_iter, init_level_set="checkerboard", smoothing=1, lambda1=1, lambda2=1, phase=0,
                 iter_callback=None):
    set_skimage_phase(phase)
    kwargs = {} if iter_callback is None else {"iter_callback": iter_callback}
    return skimage_segmentation.morphological_chan_vese(image, num_iter, init_level_set, smoothing, lambda1,
                                                        lambda2, **kwargs)


def skimage_gac(gimage, num_iter, init_level_set="disk", smoothing=1, threshold="auto", balloon=0, phase=0,
                iter_callback=None):
    set_skimage_phase(phase)
    kwargs = {} if iter_callback is None else {"iter_callback": iter_callback}
    return skimage_segmentation.morphological_geodesic_active_contour(gimage, num_iter, init_level_set, smoothing,
                                                                      threshold, balloon, **kwargs)


def draw_init(kind, shape, rng):
    """An init_level_set: the name ``kind``, or for "array" a random real array of ``shape``."""
    return rng.standard_normal(shape) if kind == "array" else kind


CHAN_VESE_PARAMS = [dict(tol=5e-3), dict(mu=0.1, lambda1=2.0, dt=1.0, max_num_iter=80), dict(max_num_iter=3)]


def check_chan_vese_against_scikit_image(chan_vese, init, params, rtol, atol):
    """``chan_vese`` (with extended_output) allclose to scikit-image's, same iteration count."""
    rng = np.random.default_rng(3)
    image = rng.random((13, 17)) + np.indices((13, 17)).sum(0) / 20.0
    init = draw_init(init, (13, 17), rng)
    seg, phi, energies = chan_vese(image, init_level_set=init, extended_output=True, **params)
    seg_sk, phi_sk, energies_sk = skimage_segmentation.chan_vese(image, init_level_set=init, extended_output=True,
                                                                 **params)
    assert len(energies) == len(energies_sk)
    np.testing.assert_allclose(phi, phi_sk, rtol=rtol, atol=atol)
    np.testing.assert_allclose(energies, energies_sk, rtol=rtol)
    np.testing.assert_array_equal(seg, seg_sk)
    np.testing.assert_array_equal(chan_vese(image, init_level_set=init, **params), seg_sk)


# --- scikit-image's test_morphsnakes.py ----------------------------------------------------------

def case_black_image(impl):
    img = np.zeros((11, 11))
    ls = impl.disk_level_set(img.shape, center=(5, 5), radius=3)
    acwe = impl.morphological_chan_vese(img, num_iter=6, init_level_set=ls)
    gac = impl.morphological_geodesic_active_contour(img, num_iter=6, init_level_set=ls)
    gac_ones = impl.morphological_geodesic_active_contour(img, num_iter=6, init_level_set=ls, balloon=1,
                                                          threshold=-1, smoothing=0)
    np.testing.assert_array_equal(acwe, np.zeros(img.shape))
    np.testing.assert_array_equal(gac, np.zeros(img.shape))
    np.testing.assert_array_equal(gac_ones, np.ones(img.shape))
    assert acwe.dtype == gac.dtype == gac_ones.dtype == np.int8


def case_blob_from_two_radii(impl):
    img = gaussian_blob()
    ls1 = impl.disk_level_set(img.shape, center=(5, 5), radius=3)
    ls2 = impl.disk_level_set(img.shape, center=(5, 5), radius=6)
    acwe1 = impl.morphological_chan_vese(img, num_iter=10, init_level_set=ls1)
    acwe2 = impl.morphological_chan_vese(img, num_iter=10, init_level_set=ls2)
    np.testing.assert_array_equal(acwe1, acwe2)
    assert acwe1.dtype == acwe2.dtype == np.int8


def case_gac_11x11(impl):
    img = impl.disk_level_set((11, 11), center=(5, 5), radius=3.5).astype(float)
    gimg = impl.inverse_gaussian_gradient(img, alpha=10.0, sigma=1.0)
    ls = impl.disk_level_set(img.shape, center=(5, 5), radius=6)
    gac = impl.morphological_geodesic_active_contour(gimg, num_iter=10, init_level_set=ls, balloon=-1)
    np.testing.assert_array_equal(gac, GAC_11X11_REFERENCE)
    assert gac.dtype == np.int8


def case_init_level_sets(impl):
    image = np.zeros((6, 6))
    checkerboard = impl.morphological_chan_vese(image, 0, "checkerboard")
    disk = impl.morphological_geodesic_active_contour(image, 0, "disk")
    np.testing.assert_array_equal(checkerboard, CHECKERBOARD_6X6)
    np.testing.assert_array_equal(disk, DISK_6X6)


def case_zero_volume(impl):
    image = np.zeros((7, 7, 7))
    evolution = []
    ls = impl.morphological_chan_vese(image, 5, "disk", iter_callback=lambda u: evolution.append(int(u.sum())))
    assert evolution[0] == 81
    assert int(ls.sum()) == 0
    assert len(evolution) == 6
    assert all(a >= b for a, b in zip(evolution[:-1], evolution[1:]))


def case_wrong_ndim(impl):
    with pytest.raises(ValueError):
        impl.morphological_chan_vese(np.zeros((10, 10, 3)), num_iter=1, init_level_set=np.zeros((10, 9)))
    with pytest.raises(ValueError):
        impl.morphological_geodesic_active_contour(np.zeros((10, 10, 3)), num_iter=1,
                                                   init_level_set=np.zeros((10, 9)))
    for fn in (impl.morphological_chan_vese, impl.morphological_geodesic_active_contour):
        with pytest.raises(ValueError):
            fn(np.zeros((4, 4, 4, 4)), num_iter=1, init_level_set=np.zeros((4, 4, 4, 4)))


# --- scikit-image's test_chan_vese.py ------------------------------------------------------------

def _square():
    img = np.zeros((10, 10))
    img[3:6, 3:6] = 1
    return img


def case_chan_vese_flat_level_set(impl):
    ls = np.full((10, 10), 1000.0)
    np.testing.assert_array_equal(impl.chan_vese(_square(), mu=0.0, tol=1e-3, init_level_set=ls), np.ones((10, 10)))
    np.testing.assert_array_equal(impl.chan_vese(_square(), mu=0.0, tol=1e-3, init_level_set=-ls),
                                  np.zeros((10, 10)))


def case_chan_vese_small_disk(impl):
    img = _square()
    np.testing.assert_array_equal(impl.chan_vese(img, mu=0.0, tol=1e-3, init_level_set="small disk"), img)


def case_chan_vese_simple_shape(impl):
    img = _square()
    np.testing.assert_array_equal(impl.chan_vese(img, mu=0.0, tol=1e-8), img)


def case_chan_vese_extended_output(impl):
    segmentation, phi, energies = impl.chan_vese(_square(), mu=0.0, tol=1e-8, extended_output=True)
    assert phi.dtype == np.float64 and segmentation.shape == phi.shape == (10, 10)
    assert len(energies) >= 1


def case_chan_vese_remove_noise(impl):
    ref = np.zeros((10, 10))
    ref[1:6, 1:6] = [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    img = ref.copy()
    img[8, 3] = 1
    result = impl.chan_vese(img, mu=0.3, tol=1e-3, max_num_iter=100, dt=10, init_level_set="disk")
    np.testing.assert_array_equal(result, ref)


def case_chan_vese_gap_closing(impl):
    ref = np.zeros((20, 20))
    ref[8:15, :] = 1
    img = ref.copy()
    img[:, 6] = 0
    result = impl.chan_vese(img, mu=0.7, tol=1e-3, max_num_iter=1000, dt=1000, init_level_set="disk")
    np.testing.assert_array_equal(result, ref)


def case_chan_vese_bad_arguments(impl):
    with pytest.raises(ValueError):
        impl.chan_vese(np.zeros((10, 10, 3)), mu=0.0, init_level_set=np.zeros((10, 9)))
    with pytest.raises(ValueError):
        impl.chan_vese(np.zeros((10, 10)), mu=0.0, init_level_set=np.zeros((10, 9)))
    with pytest.raises(ValueError):
        impl.chan_vese(np.zeros((10, 10)), mu=0.0, init_level_set="a")


def case_chan_vese_blank_image(impl):
    level_set = np.random.default_rng(0).random((10, 10))
    np.testing.assert_array_equal(impl.chan_vese(np.zeros((10, 10)), mu=0.0, tol=0.0, init_level_set=level_set),
                                  level_set > 0)


SNAKE_CASES = [case_black_image, case_blob_from_two_radii, case_gac_11x11, case_init_level_sets, case_zero_volume,
               case_wrong_ndim]
CHAN_VESE_CASES = [case_chan_vese_flat_level_set, case_chan_vese_small_disk, case_chan_vese_simple_shape,
                   case_chan_vese_extended_output, case_chan_vese_remove_noise, case_chan_vese_gap_closing,
                   case_chan_vese_bad_arguments, case_chan_vese_blank_image]


def kernels_named(name):
    """A context in which the level-set ops on NumPy arrays run the kernel set ``name``:
    "numba-cpu" (their own) or "host-shim" (the CUDA C kernels on the CPU; skips without g++)."""
    if name == "numba-cpu":
        return contextlib.nullcontext()
    from pydeform import levelset
    from tests import host_shim

    if not host_shim.compiler_available():
        pytest.skip("needs g++")
    kernels = host_shim.HostShimLevelSetKernels()
    return mock.patch.object(levelset, "levelset_kernels", lambda library, backend: kernels)
