"""The reference level-set ops (docs/levelset.md) against scikit-image itself, with the smoothing
phase scikit-image keeps in module state set explicitly: level sets bit-identical (MorphACWE on
integer-valued images, MorphGAC on any float64 gimage), Chan-Vese allclose with the same number of
iterations; and scikit-image's own test cases."""

import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import levelset as ref
from tests.levelset_cases import (
    CHAN_VESE_CASES,
    CHAN_VESE_PARAMS,
    SNAKE_CASES,
    check_chan_vese_against_scikit_image,
    draw_init,
    skimage_acwe,
    skimage_gac,
)

morphsnakes = pytest.importorskip("skimage.segmentation.morphsnakes")

REFERENCE = types.SimpleNamespace(
    morphological_chan_vese=lambda *a, **k: ref.morphological_chan_vese(*a, **k)[0],
    morphological_geodesic_active_contour=lambda *a, **k: ref.morphological_geodesic_active_contour(*a, **k)[0],
    chan_vese=ref.chan_vese,
    disk_level_set=ref.disk_level_set,
    inverse_gaussian_gradient=ref.inverse_gaussian_gradient,
)


@pytest.mark.parametrize("case", SNAKE_CASES + CHAN_VESE_CASES, ids=lambda c: c.__name__)
def test_scikit_image_cases(case):
    case(REFERENCE)


@given(st.sampled_from([(5, 7), (2, 2), (3, 4, 5), (2, 2, 2)]), st.integers(0, 2**32 - 1))
def test_curvature_operators_equal_scikit_image(shape, seed):
    u = (np.random.default_rng(seed).random(shape) < 0.5).astype(np.int8)
    np.testing.assert_array_equal(ref.sup_inf(u), morphsnakes.sup_inf(u))
    np.testing.assert_array_equal(ref.inf_sup(u), morphsnakes.inf_sup(u))


def test_is_is_not_the_dual_of_si_on_the_border():
    u = np.zeros((4, 4), dtype=np.int8)
    # the corners of SI(1) are 0 (the lines through them leave the array), so 1 - SI(1 - u) is 1 there
    np.testing.assert_array_equal(ref.inf_sup(u), morphsnakes.inf_sup(u))
    assert not ref.inf_sup(u).any() and (1 - ref.sup_inf(1 - u))[0, 0] == 1


@pytest.mark.parametrize("shape", [(6, 7), (5,), (2, 3, 4, 5)])
@pytest.mark.parametrize("init", ["checkerboard", "disk"])
def test_init_level_sets_equal_scikit_image(shape, init):
    ours = ref.checkerboard_level_set(shape) if init == "checkerboard" else ref.disk_level_set(shape)
    theirs = getattr(morphsnakes, f"{init}_level_set")(shape)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int8


SHAPES = [(9, 11), (2, 2), (6, 5, 7), (2, 3, 2)]


@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([(1, 1), (2.5, 1), (1, 0.5)]), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_acwe_equals_scikit_image_on_integer_images(shape, smoothing, phase, init, lambdas, num_iter, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    init = draw_init(init, shape, rng)
    calls = []
    ours, final_phase = ref.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas, calls.append,
                                                    phase=phase)
    theirs = skimage_acwe(image, num_iter, init, smoothing, *lambdas, phase=phase)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int8 and len(calls) == num_iter + 1
    assert final_phase == (phase + num_iter * smoothing) % 2
    # float64 images holding integers give the same level set
    np.testing.assert_array_equal(ref.morphological_chan_vese(image.astype(np.float64), num_iter, init, smoothing,
                                                              *lambdas, phase=phase)[0], ours)


@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([-1, 0, 1, 2.5]), st.sampled_from(["auto", 0.3]), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_gac_equals_scikit_image(shape, smoothing, phase, init, balloon, threshold, num_iter, seed):
    rng = np.random.default_rng(seed)
    gimage = rng.random(shape) * rng.choice([1.0, 1e-3, 1e3])
    init = draw_init(init, shape, rng)
    ours, final_phase = ref.morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold,
                                                                  balloon, phase=phase)
    theirs = skimage_gac(gimage, num_iter, init, smoothing, threshold, balloon, phase=phase)
    np.testing.assert_array_equal(ours, theirs)
    assert final_phase == (phase + num_iter * smoothing) % 2


def test_smoothing_phase_continues_a_run():
    image = np.random.default_rng(1).integers(0, 9, (12, 12))
    whole, _ = ref.morphological_chan_vese(image, 6, "disk", smoothing=1)
    half, phase = ref.morphological_chan_vese(image, 3, "disk", smoothing=1)
    rest, _ = ref.morphological_chan_vese(image, 3, half, smoothing=1, phase=phase)
    np.testing.assert_array_equal(rest, whole)
    np.testing.assert_array_equal(whole, skimage_acwe(image, 6, "disk", 1))


@pytest.mark.parametrize("init", ["checkerboard", "disk", "small disk", "array"])
@pytest.mark.parametrize("params", CHAN_VESE_PARAMS)
def test_chan_vese_equals_scikit_image(init, params):
    check_chan_vese_against_scikit_image(ref.chan_vese, init, params, rtol=1e-10, atol=1e-12)