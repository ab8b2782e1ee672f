"""pydeform's level-set ops on NumPy arrays (the Numba CPU kernels) against the reference and
scikit-image: bit-identical snakes, Chan-Vese allclose with the same iteration count, the batched
form equal to a loop, the callback, the smoothing phase, argument errors, inputs unchanged."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from pydeform import levelset
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

SHAPES = [(2, 2), (3, 5), (9, 11), (2, 2, 2), (3, 3, 3), (4, 3, 5)]


@pytest.mark.parametrize("case", SNAKE_CASES + CHAN_VESE_CASES, ids=lambda c: c.__name__)
def test_scikit_image_cases(case):
    case(levelset)


def test_public_names():
    for name in ("morphological_chan_vese", "morphological_geodesic_active_contour", "chan_vese", "sup_inf",
                 "inf_sup", "checkerboard_level_set", "disk_level_set", "inverse_gaussian_gradient", "next_phase"):
        assert getattr(pydeform, name) is getattr(levelset, name) and name in pydeform.__all__


@settings(max_examples=15)
@given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1))
def test_curvature_operators_equal_the_reference(shape, seed):
    u = (np.random.default_rng(seed).random(shape) < 0.5).astype(np.int8)
    np.testing.assert_array_equal(levelset.sup_inf(u), ref.sup_inf(u))
    np.testing.assert_array_equal(levelset.inf_sup(u), ref.inf_sup(u))


@settings(max_examples=25)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([(1, 1), (2.5, 1), (1, 0.5)]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_acwe_equals_the_reference(shape, smoothing, phase, init, lambdas, num_iter, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    init = draw_init(init, shape, rng)
    calls = []
    ours = levelset.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas, calls.append, phase=phase)
    expected, _ = ref.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas, phase=phase)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.int8 and ours.shape == shape and len(calls) == num_iter + 1


@settings(max_examples=25)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([-1, 0, 1, 2.5]), st.sampled_from(["auto", 0.3]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_gac_equals_the_reference(shape, smoothing, phase, init, balloon, threshold, num_iter, seed):
    rng = np.random.default_rng(seed)
    gimage = rng.random(shape) * rng.choice([1.0, 1e-3, 1e3])
    init = draw_init(init, shape, rng)
    ours = levelset.morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold, balloon,
                                                          phase=phase)
    expected, _ = ref.morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold, balloon,
                                                            phase=phase)
    np.testing.assert_array_equal(ours, expected)


def test_larger_runs_equal_scikit_image():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (40, 50))
    np.testing.assert_array_equal(levelset.morphological_chan_vese(image, 8, smoothing=3, phase=1),
                                  skimage_acwe(image, 8, smoothing=3, phase=1))
    gimage = levelset.inverse_gaussian_gradient(rng.random((40, 50)), alpha=50, sigma=2)
    np.testing.assert_array_equal(levelset.morphological_geodesic_active_contour(gimage, 12, balloon=-1, smoothing=2),
                                  skimage_gac(gimage, 12, balloon=-1, smoothing=2))
    volume = rng.integers(0, 9, (9, 10, 11))
    np.testing.assert_array_equal(levelset.morphological_chan_vese(volume, 4, "disk", smoothing=2),
                                  skimage_acwe(volume, 4, "disk", smoothing=2))


@pytest.mark.parametrize("shape", [(13, 70), (5, 6, 37), (3, 4, 64)])
def test_rows_long_enough_for_the_vector_loops_equal_the_reference(shape):
    """The kernels' vector loops (with and without a scalar remainder) and the rewritten row
    ends, the curvature operators' flat planes, the MorphGAC plan with and without a balloon;
    with a callback the driver runs pass by pass, without it the whole run in one kernel."""
    rng = np.random.default_rng(11)
    u = (rng.random(shape) < 0.5).astype(np.int8)
    np.testing.assert_array_equal(levelset.sup_inf(u), ref.sup_inf(u))
    np.testing.assert_array_equal(levelset.inf_sup(u), ref.inf_sup(u))
    image = rng.integers(0, 256, shape)
    np.testing.assert_array_equal(levelset.morphological_chan_vese(image, 3, u, smoothing=1),
                                  ref.morphological_chan_vese(image, 3, u, smoothing=1)[0])
    np.testing.assert_array_equal(levelset.morphological_chan_vese(image, 3, u, smoothing=1, iter_callback=len),
                                  ref.morphological_chan_vese(image, 3, u, smoothing=1)[0])
    gimage = rng.random(shape)
    for balloon in (-1, 0, 1):
        expected = ref.morphological_geodesic_active_contour(gimage, 3, u, smoothing=1, balloon=balloon)[0]
        for callback in (None, len):
            np.testing.assert_array_equal(levelset.morphological_geodesic_active_contour(
                gimage, 3, u, smoothing=1, balloon=balloon, iter_callback=callback), expected)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_gac_plan_holds_the_attachment_outcome_of_every_neighbourhood(shape):
    """Each plan word against aux = sum_i gradient_i(gimage) * d_i / distance_i evaluated by NumPy
    for every combination of differences d_i in {-1, 0, 1} (the 3-D plan evaluates half of them
    and mirrors the rest), with infinite, NaN and zero gradients among them."""
    from pydeform.backends.numba_kernels.levelset import NumbaCpuLevelSetKernels

    rng = np.random.default_rng(12)
    gimage = rng.random(shape)
    gimage[(1,) * len(shape)], gimage[(2,) * len(shape)] = np.inf, np.nan
    gimage[(0,) * (len(shape) - 1) + (slice(None),)] = 0.5
    limit = np.array([0.4])
    plan = NumbaCpuLevelSetKernels().gac_plan(gimage[None], limit)[0].astype(np.uint64)
    ndim, codes = len(shape), 3 ** len(shape)
    inverses = [np.where((np.arange(n) == 0) | (np.arange(n) == n - 1), 1.0, 0.5).reshape(
        [-1 if i == axis else 1 for i in range(ndim)]) for axis, n in enumerate(shape)]
    with np.errstate(invalid="ignore"):  # inf - inf in the gradient, inf * 0.0 in aux: NaN as in the kernel
        gradients = np.gradient(gimage)
        auxes = []
        for code in range(codes):
            differences = [code // 3 ** (ndim - 1 - axis) % 3 - 1 for axis in range(ndim)]
            aux = 0.0
            for gradient, inverse, difference in zip(gradients, inverses, differences):
                aux = aux + gradient * (float(difference) * inverse)
            auxes.append(aux)
    for code, aux in enumerate(auxes):
        np.testing.assert_array_equal(plan >> np.uint64(code) & np.uint64(1), aux > 0)
        np.testing.assert_array_equal(plan >> np.uint64(code + codes) & np.uint64(1), ~(aux < 0))
    np.testing.assert_array_equal(plan >> np.uint64(2 * codes) & np.uint64(1), gimage > limit[0])


def test_phase_continues_a_run_exactly():
    image = np.random.default_rng(1).integers(0, 9, (12, 12))
    whole = levelset.morphological_chan_vese(image, 6, "disk", smoothing=3)
    half = levelset.morphological_chan_vese(image, 3, "disk", smoothing=3)
    rest = levelset.morphological_chan_vese(image, 3, half, smoothing=3, phase=levelset.next_phase(0, 3, 3))
    np.testing.assert_array_equal(rest, whole)


def test_nan_and_infinite_values_propagate_as_in_scikit_image():
    image = np.random.default_rng(2).integers(0, 9, (8, 9)).astype(np.float64)
    image[3, 4] = np.nan
    np.testing.assert_array_equal(levelset.morphological_chan_vese(image, 3), skimage_acwe(image, 3))
    gimage = np.random.default_rng(3).random((8, 9))
    gimage[2, 2], gimage[5, 6] = np.inf, np.nan
    np.testing.assert_array_equal(levelset.morphological_geodesic_active_contour(gimage, 3, balloon=1, threshold=0.5),
                                  skimage_gac(gimage, 3, balloon=1, threshold=0.5))


@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 3, 4, 5)])
def test_batched_snakes_equal_a_loop(shape):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, shape)
    gimages = rng.random(shape)
    init = rng.standard_normal(shape)
    calls = []
    acwe = levelset.morphological_chan_vese(images, 3, init, 2, iter_callback=calls.append, phase=1, batched=True)
    gac = levelset.morphological_geodesic_active_contour(gimages, 3, init, 1, balloon=-1, batched=True)
    shared = levelset.morphological_geodesic_active_contour(gimages, 2, init[0], 1, balloon=1, batched=True)
    for b in range(shape[0]):
        np.testing.assert_array_equal(acwe[b], levelset.morphological_chan_vese(images[b], 3, init[b], 2, phase=1))
        np.testing.assert_array_equal(gac[b], levelset.morphological_geodesic_active_contour(gimages[b], 3, init[b], 1,
                                                                                             balloon=-1))
        np.testing.assert_array_equal(shared[b], levelset.morphological_geodesic_active_contour(
            gimages[b], 2, init[0], 1, balloon=1))
    assert len(calls) == 4 and calls[0].shape == shape


def test_batched_chan_vese_stops_each_image_on_its_own():
    rng = np.random.default_rng(5)
    images = np.stack([np.kron(rng.random((3, 3)), np.ones((4, 4))), rng.random((12, 12)), np.zeros((12, 12))])
    seg, phi, energies = levelset.chan_vese(images, tol=1e-3, max_num_iter=60, extended_output=True, batched=True)
    for b in range(3):
        seg_b, phi_b, energies_b = levelset.chan_vese(images[b], tol=1e-3, max_num_iter=60, extended_output=True)
        np.testing.assert_array_equal(seg[b], seg_b)
        np.testing.assert_allclose(phi[b], phi_b, rtol=1e-12, atol=1e-14)
        assert len(energies[b]) == len(energies_b)
    assert len({len(e) for e in energies}) > 1


def test_chan_vese_row_blocks_equal_the_reference_and_do_not_depend_on_the_thread_count():
    """Images of several row blocks of the threaded step (the last one partial), one stopping
    before the other: the reference's segmentation, phi and iteration count, and the same bits
    on one thread as on all of them."""
    import numba

    from pydeform.backends.numba_kernels.levelset import CHAN_VESE_BLOCK_ROWS

    rng = np.random.default_rng(7)
    height = 2 * CHAN_VESE_BLOCK_ROWS + 5
    square = np.zeros((height, 9))
    square[10:30, 2:7] = 1.0
    images = np.stack([square, rng.random((height, 9))])
    previous = numba.get_num_threads()
    runs = []
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            runs.append(levelset.chan_vese(images, tol=5e-3, max_num_iter=60, extended_output=True, batched=True))
    finally:
        numba.set_num_threads(previous)
    ours = runs[0]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.phi, ours.phi)
        for b in range(2):
            np.testing.assert_array_equal(other.energies[b], ours.energies[b])
    assert len(ours.energies[0]) != len(ours.energies[1])
    for b in range(2):
        seg, phi, energies = ref.chan_vese(images[b], tol=5e-3, max_num_iter=60, extended_output=True)
        # phi flattens to differences of 1e-8 where the square's image is constant, so that the
        # rounding of the rewritten update (docs/levelset.md) grows to 1e-8
        np.testing.assert_allclose(ours.phi[b], phi, rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(ours.segmentation[b], seg)
        assert len(ours.energies[b]) == len(energies)


@pytest.mark.parametrize("init", ["checkerboard", "disk", "small disk", "array"])
@pytest.mark.parametrize("params", CHAN_VESE_PARAMS)
def test_chan_vese_equals_scikit_image(init, params):
    # the sums run in another order than NumPy's pairwise ones; many steps amplify that
    check_chan_vese_against_scikit_image(levelset.chan_vese, init, params, rtol=1e-6, atol=1e-8)


def test_inputs_are_unchanged():
    rng = np.random.default_rng(6)
    image, init = rng.integers(0, 9, (6, 7)).astype(np.float64), rng.standard_normal((6, 7))
    image_copy, init_copy = image.copy(), init.copy()
    levelset.morphological_chan_vese(image, 2, init)
    levelset.morphological_geodesic_active_contour(image, 2, init, balloon=1)
    levelset.chan_vese(image, init_level_set=init, max_num_iter=3)
    levelset.sup_inf(init)
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(init, init_copy)


def test_inverse_gaussian_gradient_equals_scikit_image():
    from skimage.segmentation import inverse_gaussian_gradient

    image = np.random.default_rng(8).random((12, 14))
    np.testing.assert_array_equal(levelset.inverse_gaussian_gradient(image, 20.0, 1.5),
                                  inverse_gaussian_gradient(image, 20.0, 1.5))



@pytest.mark.parametrize("shape", [(1,), (7, 9), (0, 3), (12, 5), (3, 4, 5), (6, 1, 2)])
def test_initial_level_sets_equal_scikit_image(shape):
    from skimage.segmentation import checkerboard_level_set, disk_level_set

    for square_size in (1, 2, 5):
        ours, theirs = levelset.checkerboard_level_set(shape, square_size), checkerboard_level_set(shape, square_size)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    for center, radius in [(None, None), (tuple(0.3 * n + 0.1 for n in shape), 2.5), ((1,) * len(shape), None)]:
        if 0 in shape and radius is None:
            continue
        ours = levelset.disk_level_set(shape, center=center, radius=radius)
        theirs = disk_level_set(shape, center=center, radius=radius)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)

SNAKES = [levelset.morphological_chan_vese, levelset.morphological_geodesic_active_contour]


@pytest.mark.parametrize("snake", SNAKES)
def test_argument_errors(snake):
    with pytest.raises(ValueError, match="image"):
        snake(np.zeros(5), 1, np.zeros(5))
    with pytest.raises(ValueError, match="image"):
        snake(np.zeros((2, 3, 4, 5)), 1, np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="init_level_set"):
        snake(np.zeros((4, 5)), 1, np.zeros((4, 5, 1)))
    with pytest.raises(ValueError, match="init_level_set"):
        snake(np.zeros((4, 5)), 1, "square")
    with pytest.raises(ValueError, match="phase"):
        snake(np.zeros((4, 5)), 1, phase=2)
    with pytest.raises(ValueError, match="num_iter"):
        snake(np.zeros((4, 5)), -1)
    with pytest.raises(TypeError, match="image"):
        snake(np.zeros((4, 5), dtype=complex), 1)
    with pytest.raises(ValueError, match="batched"):
        snake(np.zeros((4, 5)), 1, batched=True)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 3, 3), (3, 3, 1)])
def test_size_one_axes_raise_like_scikit_image(shape):
    with pytest.raises(ValueError):
        skimage_acwe(np.zeros(shape), 1)
    with pytest.raises(ValueError, match="at least 2"):
        levelset.morphological_chan_vese(np.zeros(shape), 1)
    with pytest.raises(ValueError):
        skimage_gac(np.zeros(shape), 0)
    with pytest.raises(ValueError, match="at least 2"):
        levelset.morphological_geodesic_active_contour(np.zeros(shape), 0)
    # no iteration, no gradient: scikit-image's MorphACWE returns the initial level set
    np.testing.assert_array_equal(levelset.morphological_chan_vese(np.zeros(shape), 0),
                                  skimage_acwe(np.zeros(shape), 0))


def test_empty_batches_and_empty_images():
    """An empty batch runs (nothing to do); an empty image raises as for size-1 axes."""
    for snake in SNAKES:
        for balloon in (0, 1):
            kwargs = {"balloon": balloon} if snake is levelset.morphological_geodesic_active_contour else {}
            empty = snake(np.zeros((0, 4, 4)), 2, batched=True, **kwargs)
            assert empty.shape == (0, 4, 4) and empty.dtype == np.int8
        with pytest.raises(ValueError, match="at least 2"):
            snake(np.zeros((0, 3)), 2)
    assert levelset.chan_vese(np.zeros((0, 4, 4)), batched=True).shape == (0, 4, 4)
