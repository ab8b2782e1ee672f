"""The CuPy RawKernel sources of the level-set ops (levelset.cu), run on the CPU through the host
shim (tests/host_shim.py) under the public ops, against the float64 reference and scikit-image:
as one thread of one block, and as real multi-threaded blocks (several OS threads per block
meeting at __syncthreads, fewer blocks than (image, chunk) jobs), which exercises the
deterministic block sums with concurrent threads, odd thread counts included."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydeform import levelset
from reference import levelset as ref
from tests import host_shim
from tests.levelset_cases import CHAN_VESE_CASES, SNAKE_CASES, draw_init, skimage_acwe

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

SHAPES = [(2, 2), (3, 5), (4, 7), (2, 2, 2), (3, 3, 3), (3, 2, 4)]


def ops_running(kernels):
    """The public level-set ops, for NumPy arrays, run ``kernels``."""
    return mock.patch.object(levelset, "levelset_kernels", lambda library, backend: kernels)


@pytest.fixture(scope="module")
def one_thread():
    return host_shim.HostShimLevelSetKernels()


@pytest.mark.parametrize("case", SNAKE_CASES + CHAN_VESE_CASES, ids=lambda c: c.__name__)
def test_scikit_image_cases(case, one_thread):
    with ops_running(one_thread):
        case(levelset)


@settings(max_examples=10)
@given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1))
def test_curvature_operators_equal_the_reference(shape, seed):
    u = (np.random.default_rng(seed).random(shape) < 0.5).astype(np.int8)
    with ops_running(host_shim.HostShimLevelSetKernels()):
        np.testing.assert_array_equal(levelset.sup_inf(u), ref.sup_inf(u))
        np.testing.assert_array_equal(levelset.inf_sup(u), ref.inf_sup(u))


@settings(max_examples=15)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]), st.sampled_from([(1, 1), (2.5, 1), (1, 0.5)]),
       st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_acwe_equals_the_reference(shape, smoothing, phase, init, lambdas, num_iter, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    init = draw_init(init, shape, rng)
    calls = []
    with ops_running(host_shim.HostShimLevelSetKernels()):
        ours = levelset.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas, calls.append,
                                                phase=phase)
    expected, _ = ref.morphological_chan_vese(image, num_iter, init, smoothing, *lambdas, phase=phase)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.int8 and ours.shape == shape and len(calls) == num_iter + 1


@settings(max_examples=15)
@given(st.sampled_from(SHAPES), st.integers(0, 3), st.integers(0, 1),
       st.sampled_from(["checkerboard", "disk", "array"]), st.sampled_from([-1, 0, 1, 2.5]),
       st.sampled_from(["auto", 0.3]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_gac_equals_the_reference(shape, smoothing, phase, init, balloon, threshold, num_iter, seed):
    rng = np.random.default_rng(seed)
    gimage = rng.random(shape) * rng.choice([1.0, 1e-3, 1e3])
    init = draw_init(init, shape, rng)
    with ops_running(host_shim.HostShimLevelSetKernels()):
        ours = levelset.morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold, balloon,
                                                              phase=phase)
    expected, _ = ref.morphological_geodesic_active_contour(gimage, num_iter, init, smoothing, threshold, balloon,
                                                            phase=phase)
    np.testing.assert_array_equal(ours, expected)


# At most 60 iterations: on noise that never converges (a 6x4 uniform image runs the default 500)
# the rounding of the sums' order grows about 1000-fold every 40 iterations (1e-15 after 30, 1e-12
# after 60, 4e-9 after 100, 3e-2 after 200), so the default limit compares chaos, not the kernels.
@settings(max_examples=8)
@given(st.sampled_from([(2, 2), (3, 5), (6, 4), (9, 11)]), st.sampled_from(["checkerboard", "disk", "array"]),
       st.sampled_from([dict(max_num_iter=60), dict(mu=0.1, lambda1=2.0, dt=1.0, max_num_iter=30), dict(tol=0.0, max_num_iter=4)]),
       st.integers(0, 2**32 - 1))
def test_chan_vese_equals_the_reference(shape, init, params, seed):
    rng = np.random.default_rng(seed)
    image = rng.random(shape)
    init = draw_init(init, shape, rng)
    with ops_running(host_shim.HostShimLevelSetKernels()):
        seg, phi, energies = levelset.chan_vese(image, init_level_set=init, extended_output=True, **params)
    seg_ref, phi_ref, energies_ref = ref.chan_vese(image, init_level_set=init, extended_output=True, **params)
    assert len(energies) == len(energies_ref)
    # the sums run in another order than NumPy's pairwise ones; many steps amplify that
    np.testing.assert_allclose(phi, phi_ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(seg, seg_ref)


def test_larger_runs_equal_scikit_image(one_thread):
    """Images wider than one chunk of the sums (several chunks per image, a partial last one)."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (31, 700))
    with ops_running(one_thread):
        ours = levelset.morphological_chan_vese(image, 4, smoothing=3, phase=1)
    np.testing.assert_array_equal(ours, skimage_acwe(image, 4, smoothing=3, phase=1))


def test_nan_and_infinite_values_propagate_as_in_the_reference(one_thread):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 9, (8, 9)).astype(np.float64)
    image[3, 4] = np.nan
    gimage = rng.random((8, 9))
    gimage[2, 2], gimage[5, 6] = np.inf, np.nan
    with ops_running(one_thread):
        acwe = levelset.morphological_chan_vese(image, 3)
        gac = levelset.morphological_geodesic_active_contour(gimage, 3, balloon=1, threshold=0.5)
        gac_auto = levelset.morphological_geodesic_active_contour(gimage, 3, balloon=-1)
    np.testing.assert_array_equal(acwe, ref.morphological_chan_vese(image, 3)[0])
    np.testing.assert_array_equal(gac, ref.morphological_geodesic_active_contour(gimage, 3, balloon=1,
                                                                                 threshold=0.5)[0])
    np.testing.assert_array_equal(gac_auto, ref.morphological_geodesic_active_contour(gimage, 3, balloon=-1)[0])


def batched_inputs(rng, shape):
    """(images, gimages, init) of a batch of ``shape``."""
    return rng.integers(0, 256, shape).astype(np.float64), rng.random(shape), rng.standard_normal(shape)


def run_all_batched(kernels, inputs):
    """Every op, batched, on ``inputs`` (batched_inputs); chan_vese for 2-D images only."""
    images, gimages, init = inputs
    shape = images.shape
    with ops_running(kernels):
        results = [levelset.morphological_chan_vese(images, 3, init, 2, phase=1, batched=True),
                   levelset.morphological_geodesic_active_contour(gimages, 3, init, 1, balloon=-1, batched=True),
                   levelset.morphological_geodesic_active_contour(gimages, 2, init[0], 1, balloon=1, batched=True)]
        if len(shape) == 3:
            results.append(levelset.chan_vese(gimages, max_num_iter=20, init_level_set=init, extended_output=True,
                                              batched=True))
    return results


@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 3, 4, 5)])
def test_batched_ops_equal_a_loop_and_leave_their_inputs_unchanged(shape, one_thread):
    inputs = images, gimages, init = batched_inputs(np.random.default_rng(4), shape)
    copies = [a.copy() for a in inputs]
    results = run_all_batched(one_thread, inputs)
    for array, copy in zip(inputs, copies):
        np.testing.assert_array_equal(array, copy)
    for b in range(shape[0]):
        np.testing.assert_array_equal(results[0][b], ref.morphological_chan_vese(images[b], 3, init[b], 2,
                                                                                 phase=1)[0])
        np.testing.assert_array_equal(results[1][b], ref.morphological_geodesic_active_contour(
            gimages[b], 3, init[b], 1, balloon=-1)[0])
        np.testing.assert_array_equal(results[2][b], ref.morphological_geodesic_active_contour(
            gimages[b], 2, init[0], 1, balloon=1)[0])
        if len(shape) == 3:
            seg, phi, energies = results[3]
            seg_b, phi_b, energies_b = ref.chan_vese(gimages[b], max_num_iter=20, init_level_set=init[b],
                                                     extended_output=True)
            np.testing.assert_allclose(phi[b], phi_b, rtol=1e-6, atol=1e-8)
            np.testing.assert_array_equal(seg[b], seg_b)
            assert len(energies[b]) == len(energies_b)


@pytest.mark.parametrize("grid, block", [(1, 2), (3, 7), (2, 32)], ids=["1x2", "3x7", "2x32"])
def test_threaded_blocks_equal_one_thread(grid, block, one_thread):
    """The block sums with concurrent threads (any block shape) give the one thread's level sets,
    and the same bits on a second run."""
    shape = (2, 9, 700)  # three chunks of rows per image
    inputs = batched_inputs(np.random.default_rng(9), shape)
    expected = run_all_batched(one_thread, inputs)
    threaded = host_shim.HostShimBlocksLevelSetKernels.with_blocks(grid, block)
    runs = [run_all_batched(threaded, inputs) for _ in range(2)]
    for ours, theirs in zip(runs[0][:3], expected[:3]):
        np.testing.assert_array_equal(ours, theirs)
    (seg, phi, _), (seg_1, phi_1, _) = runs[0][3], expected[3]
    np.testing.assert_allclose(phi, phi_1, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(seg, seg_1)
    assert runs[1][3][1].tobytes() == phi.tobytes()


@settings(max_examples=40)
@given(st.integers(1, 3), st.integers(2, 40), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 3]))
def test_auto_threshold_equals_numpy_percentile(batch, size, seed, specials):
    """The 40th percentile the MorphGAC driver computes with array operations (so that CuPy
    rounds it as NumPy) equals np.percentile, NaN and infinities included."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, 2, size)) * rng.choice([1e-300, 1.0, 1e300])
    flat = images.reshape(-1)
    flat[rng.integers(0, flat.size, specials)] = rng.choice([np.nan, np.inf, -np.inf], specials)
    expected = np.percentile(images.reshape(batch, -1), 40, axis=1)
    np.testing.assert_array_equal(levelset._percentile_40(np, images), expected)


@pytest.mark.parametrize("shape", [(0, 4, 5), (0, 3, 4, 5)], ids=["2d", "3d"])
def test_empty_batches(shape, one_thread):
    with ops_running(one_thread):
        results = [levelset.morphological_chan_vese(np.zeros(shape), 2, batched=True),
                   levelset.morphological_geodesic_active_contour(np.zeros(shape), 2, balloon=1, batched=True)]
        if len(shape) == 3:
            results.append(levelset.chan_vese(np.zeros(shape), batched=True))
    assert [r.shape for r in results] == [shape] * len(results)
