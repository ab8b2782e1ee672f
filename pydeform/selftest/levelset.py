"""The level-set ops' selftest checks: scikit-image's own morphsnakes and chan_vese test cases
(whose answers are written out there) ported, the curvature operators against their direct NumPy
formulation, a run continued at :func:`pydeform.next_phase` equal to one run, the batched form
equal to a loop, an integer image in float32 / float16 equal to float64 and, on a GPU, every op
equal to the Numba CPU backend (bit for bit for the snakes; Chan-Vese's phi to 1e-10 with the
same segmentation and number of iterations). The errors of the snakes are counts of differing
pixels, so their tolerance is 0.
"""

from __future__ import annotations

import numpy as np

from ..levelset import (
    chan_vese, disk_level_set, inf_sup, inverse_gaussian_gradient, morphological_chan_vese,
    morphological_geodesic_active_contour, next_phase, sup_inf,
)
from .common import NUMBA_CPU, check, float64_only, gpu_only, relative_error

EXACT = {"float64": 0.0}
CHAN_VESE_TOLERANCE = {"float64": 1e-10}
ACWE = "morphological_chan_vese"
GAC = "morphological_geodesic_active_contour"


def _gpu_float64(backend, dtype):
    return backend.on_gpu and dtype == "float64"


def _integer_dtypes(backend, dtype):
    """Dtypes below float64 that hold the integers 0..255 exactly and the ops take."""
    return dtype in ("float32", "float16")


def _host(backend, value):
    """``value`` (an array, or a tuple of them such as a ChanVeseResult) with NumPy arrays."""
    if isinstance(value, tuple):
        parts = [_host(backend, part) for part in value]
        return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)
    return value if isinstance(value, np.ndarray) else backend.xp.asnumpy(value)


def run_op(backend, function, image, *args, dtype="float64", **options):
    """``function`` on ``image`` (in ``dtype``) and its other array arguments on ``backend``'s
    device (``init_level_set`` too when an array), the result as a NumPy array."""
    if isinstance(options.get("init_level_set"), np.ndarray):
        options["init_level_set"] = backend.xp.asarray(options["init_level_set"])
    result = function(backend.to_device(image, dtype), *args, **options, backend=backend.option)
    return _host(backend, result)


def _differing(actual, expected) -> float:
    """The number of differing elements (the shapes must match)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.count_nonzero(actual != expected))


def _differing_or_wrong_dtype(actual, expected) -> float:
    return _differing(actual, expected) + (0.0 if actual.dtype == np.int8 else float("inf"))


# --- scikit-image's test_morphsnakes.py ---------------------------------------------------------

def gaussian_blob():
    """scikit-image's 11x11 test image: exp(-r^2 / 10) around the centre."""
    coords = np.mgrid[-5:6, -5:6]
    return np.exp(-(coords**2).sum(0) / 10)


#: scikit-image's answer of MorphGAC on the 11x11 disk (radius 3.5) from a radius-6 disk, balloon -1.
GAC_11X11_REFERENCE = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.int8)
CHECKERBOARD_6X6 = np.array([[0, 0, 0, 0, 0, 1]] * 5 + [[1, 1, 1, 1, 1, 0]], dtype=np.int8)
DISK_6X6 = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1],
                     [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=np.int8)


@check(ACWE, "black image = zeros", EXACT, float64_only)
def _acwe_black(backend, dtype, quick):
    init = disk_level_set((11, 11), center=(5, 5), radius=3)
    u = run_op(backend, morphological_chan_vese, np.zeros((11, 11)), 6, init_level_set=init)
    return _differing_or_wrong_dtype(u, np.zeros((11, 11), np.int8))


@check(GAC, "black image = zeros, balloon 1 = ones", EXACT, float64_only)
def _gac_black(backend, dtype, quick):
    init = disk_level_set((11, 11), center=(5, 5), radius=3)
    plain = run_op(backend, morphological_geodesic_active_contour, np.zeros((11, 11)), 6, init_level_set=init)
    grown = run_op(backend, morphological_geodesic_active_contour, np.zeros((11, 11)), 6, init_level_set=init,
                 balloon=1, threshold=-1, smoothing=0)
    return (_differing_or_wrong_dtype(plain, np.zeros((11, 11), np.int8))
            + _differing_or_wrong_dtype(grown, np.ones((11, 11), np.int8)))


@check(ACWE, "blob from radius 3 = from radius 6", EXACT, float64_only)
def _acwe_blob(backend, dtype, quick):
    runs = [run_op(backend, morphological_chan_vese, gaussian_blob(), 10,
                 init_level_set=disk_level_set((11, 11), center=(5, 5), radius=radius)) for radius in (3, 6)]
    # Both converge to the blob's centre region, which is neither empty nor everything.
    degenerate = float(runs[0].sum() in (0, runs[0].size))
    return _differing_or_wrong_dtype(*runs) + degenerate


@check(GAC, "11x11 disk, balloon -1 = scikit-image's answer", EXACT, float64_only)
def _gac_11x11(backend, dtype, quick):
    disk = disk_level_set((11, 11), center=(5, 5), radius=3.5).astype(np.float64)
    gimage = inverse_gaussian_gradient(disk, alpha=10.0, sigma=1.0)
    u = run_op(backend, morphological_geodesic_active_contour, gimage, 10,
             init_level_set=disk_level_set((11, 11), center=(5, 5), radius=6), balloon=-1)
    return _differing_or_wrong_dtype(u, GAC_11X11_REFERENCE)


@check(ACWE, "6x6 checkerboard start", EXACT, float64_only)
def _acwe_start(backend, dtype, quick):
    return _differing_or_wrong_dtype(run_op(backend, morphological_chan_vese, np.zeros((6, 6)), 0, "checkerboard"),
                                     CHECKERBOARD_6X6)


@check(GAC, "6x6 disk start", EXACT, float64_only)
def _gac_start(backend, dtype, quick):
    return _differing_or_wrong_dtype(
        run_op(backend, morphological_geodesic_active_contour, np.zeros((6, 6)), 0, "disk"), DISK_6X6)


@check(ACWE, "zero volume shrinks to nothing", EXACT, float64_only)
def _acwe_zero_volume(backend, dtype, quick):
    sizes = []
    u = run_op(backend, morphological_chan_vese, np.zeros((7, 7, 7)), 5, "disk",
             iter_callback=lambda level_set: sizes.append(int(level_set.sum())))
    growing = sum(after > before for before, after in zip(sizes, sizes[1:]))
    return abs(len(sizes) - 6) + abs(sizes[0] - 81) + int(u.sum()) + growing


# --- scikit-image's test_chan_vese.py ----------------------------------------------------------

def _square():
    image = np.zeros((10, 10))
    image[3:6, 3:6] = 1
    return image


def _chan_vese_cases():
    """(image, options, expected segmentation) of scikit-image's chan_vese tests."""
    flat = np.full((10, 10), 1000.0)
    noisy = np.zeros((10, 10))
    noisy[1:6, 1:6] = [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    clean = noisy.copy()
    noisy[8, 3] = 1
    band = np.zeros((20, 20))
    band[8:15, :] = 1
    gap = band.copy()
    gap[:, 6] = 0
    blank_start = np.random.default_rng(0).random((10, 10))
    return [
        (_square(), dict(mu=0.0, tol=1e-3, init_level_set=flat), np.ones((10, 10), bool)),
        (_square(), dict(mu=0.0, tol=1e-3, init_level_set=-flat), np.zeros((10, 10), bool)),
        (_square(), dict(mu=0.0, tol=1e-3, init_level_set="small disk"), _square() > 0),
        (_square(), dict(mu=0.0, tol=1e-8), _square() > 0),
        (noisy, dict(mu=0.3, tol=1e-3, max_num_iter=100, dt=10, init_level_set="disk"), clean > 0),
        (gap, dict(mu=0.7, tol=1e-3, max_num_iter=1000, dt=1000, init_level_set="disk"), band > 0),
        (np.zeros((10, 10)), dict(mu=0.0, tol=0.0, init_level_set=blank_start), blank_start > 0),
    ]


@check("chan_vese", "scikit-image's test cases", EXACT, float64_only)
def _chan_vese_cases_check(backend, dtype, quick):
    cases = _chan_vese_cases()
    errors = 0.0
    for image, options, expected in cases[:3] if quick else cases:
        segmentation = run_op(backend, chan_vese, image, **options)
        errors += _differing(segmentation, expected) + (0.0 if segmentation.dtype == bool else float("inf"))
    return errors


# --- the curvature operators -------------------------------------------------------------------

def line_elements(ndim):
    """scikit-image's structuring elements of the curvature operators: in 2-D the 4 segments of
    3 pixels through the centre, in 3-D the 9 planes of 3x3 voxels through it (bool)."""
    if ndim == 2:
        eye = np.eye(3, dtype=bool)
        column = np.zeros((3, 3), bool)
        column[:, 1] = True
        return [eye, column, eye[::-1], column.T]
    planes = [np.zeros((3, 3, 3), bool) for _ in range(9)]
    planes[0][:, :, 1] = planes[1][:, 1, :] = planes[2][1, :, :] = True
    up, down = [0, 1, 2], [2, 1, 0]
    planes[3][:, up, up] = planes[4][:, up, down] = True
    planes[5][up, :, up] = planes[6][up, :, down] = True
    planes[7][up, up, :] = planes[8][up, down, :] = True
    return planes


def numpy_curvature(u, operator):
    """SI (``operator="sup_inf"``: the largest erosion by a line element) or IS (``"inf_sup"``:
    the smallest dilation) of ``u > 0`` with everything outside the array 0, int8."""
    padded = np.pad(u > 0, 1)
    per_element = []
    for element in line_elements(u.ndim):
        views = [padded[tuple(slice(o, o + n) for o, n in zip(offset, u.shape))]
                 for offset in zip(*np.nonzero(element))]
        per_element.append(np.logical_and.reduce(views) if operator == "sup_inf" else np.logical_or.reduce(views))
    combined = np.logical_or.reduce(per_element) if operator == "sup_inf" else np.logical_and.reduce(per_element)
    return combined.astype(np.int8)


def _default_or_cupy(backend, dtype):
    """sup_inf and inf_sup take no backend argument: they run on the array library's default."""
    return dtype == "float64" and backend.option in (None, "cupy")


def _curvature_check(operator):
    def run(backend, dtype, quick):
        function = {"sup_inf": sup_inf, "inf_sup": inf_sup}[operator]
        rng = np.random.default_rng(50)
        errors = 0.0
        for shape in ((1, 1), (2, 3), (9, 12), (5, 6, 7))[: 2 if quick else None]:
            u = (rng.random(shape) < 0.6).astype(np.int8)
            actual = _host(backend, function(backend.xp.asarray(u)))
            errors += _differing_or_wrong_dtype(actual, numpy_curvature(u, operator))
        return errors

    return run


check("sup_inf", "= largest line erosion (NumPy)", EXACT, _default_or_cupy)(_curvature_check("sup_inf"))
check("inf_sup", "= smallest line dilation (NumPy)", EXACT, _default_or_cupy)(_curvature_check("inf_sup"))


# --- runs: continued, batched, other dtypes, GPU against the CPU ------------------------------------

def integer_image(rng, shape):
    """Integer values 0..255 with a bright region, as float64."""
    image = rng.integers(0, 120, shape).astype(np.float64)
    image[tuple(slice(n // 4, n // 4 + max(n // 2, 1)) for n in shape)] += 120
    return image


def snake_cases(rng, quick):
    """(op, image, arguments, options) of both snakes in 2-D and 3-D on random inputs."""
    cases = []
    for shape in ((16, 20), (6, 7, 8))[:1 if quick else None]:
        image = integer_image(rng, shape)
        gimage = 1.0 / np.sqrt(1.0 + 10 * np.abs(np.gradient(image / 255.0, axis=0)))
        start = (rng.random(shape) < 0.5).astype(np.int8)
        cases += [
            (morphological_chan_vese, image, (6,), dict(init_level_set="checkerboard", smoothing=3, phase=1)),
            (morphological_chan_vese, image, (5,), dict(init_level_set=start, smoothing=2, lambda1=2.0)),
            (morphological_geodesic_active_contour, gimage, (6,), dict(smoothing=1, balloon=-1)),
            (morphological_geodesic_active_contour, gimage, (6,), dict(init_level_set=start, balloon=1.5,
                                                                       threshold=0.9, smoothing=2, phase=1)),
        ]
    return cases


def _snake_case_check(op, compare):
    """For each random case of ``op``'s snake: ``compare(backend, dtype, case)`` -> error."""

    def run(backend, dtype, quick):
        cases = [case for case in snake_cases(np.random.default_rng(51), quick) if case[0].__name__ == op]
        return max(compare(backend, dtype, case) for case in cases)

    return run


def _vs_numba_cpu(backend, dtype, case):
    function, image, args, options = case
    return _differing(run_op(backend, function, image, *args, **options),
                      run_op(NUMBA_CPU, function, image, *args, **options))


def _continued(backend, dtype, case):
    """Two runs of a and b iterations, the second started at next_phase of the first, equal one
    run of a + b iterations."""
    function, image, (num_iter,), options = case
    first = num_iter // 2
    options = dict(options, phase=options.get("phase", 0))
    half = run_op(backend, function, image, first, **options)
    rest = dict(options, init_level_set=half, phase=next_phase(options["phase"], first, options.get("smoothing", 1)))
    return _differing(run_op(backend, function, image, num_iter - first, **rest),
                      run_op(backend, function, image, num_iter, **options))


def _batched_vs_loop(backend, dtype, case):
    """Three images (the case's, scaled, reversed) in one batched call equal three calls."""
    function, image, args, options = case
    images = np.stack([image, image * 0.5, image[::-1].copy()])
    looped = np.stack([run_op(backend, function, one, *args, **options) for one in images])
    return _differing(run_op(backend, function, images, *args, **options, batched=True), looped)


def _in_dtype(backend, dtype, case):
    """The integer-valued image (gimage: rounded to a 1/64 grid) stored in ``dtype`` gives the
    float64 result."""
    function, image, args, options = case
    if function is morphological_geodesic_active_contour:
        image = np.round(image * 64) / 64
    return _differing(run_op(backend, function, image, *args, dtype=dtype, **options),
                      run_op(backend, function, image, *args, **options))


for _op in (ACWE, GAC):
    check(_op, "vs numba-cpu", EXACT, _gpu_float64)(_snake_case_check(_op, _vs_numba_cpu))
    check(_op, "continued at next_phase = one run", EXACT, float64_only)(_snake_case_check(_op, _continued))
    check(_op, "batched = loop", EXACT, float64_only)(_snake_case_check(_op, _batched_vs_loop))
    check(_op, "image in dtype = float64", {"float32": 0.0, "float16": 0.0}, _integer_dtypes)(
        _snake_case_check(_op, _in_dtype))


def _chan_vese_runs(backend, image, **options):
    return run_op(backend, chan_vese, image, extended_output=True, **options)


CHAN_VESE_OPTIONS = (dict(tol=1e-4, max_num_iter=60), dict(mu=0.1, lambda1=2.0, dt=1.0, max_num_iter=30,
                                                           init_level_set="disk"))


@check("chan_vese", "vs numba-cpu", CHAN_VESE_TOLERANCE, _gpu_float64)
def _chan_vese_vs_numba_cpu(backend, dtype, quick):
    rng = np.random.default_rng(52)
    errors = []
    for options in CHAN_VESE_OPTIONS[:1] if quick else CHAN_VESE_OPTIONS:
        image = integer_image(rng, (17, 23))
        segmentation, phi, energies = _chan_vese_runs(backend, image, **options)
        expected_segmentation, expected_phi, expected_energies = _chan_vese_runs(NUMBA_CPU, image, **options)
        if len(energies) != len(expected_energies) or _differing(segmentation, expected_segmentation):
            return float("inf")
        errors += [relative_error(phi, expected_phi), relative_error(energies, expected_energies)]
    return max(errors)


@check("chan_vese", "batched = loop", CHAN_VESE_TOLERANCE, float64_only)
def _chan_vese_batched(backend, dtype, quick):
    """Each image stops on its own test: the batch holds an image that stops early."""
    rng = np.random.default_rng(53)
    images = np.stack([integer_image(rng, (12, 15)), np.zeros((12, 15)), integer_image(rng, (12, 15))])
    options = dict(tol=1e-3, max_num_iter=40)
    segmentation, phi, energies = _chan_vese_runs(backend, images, batched=True, **options)
    errors = []
    for index, image in enumerate(images):
        expected_segmentation, expected_phi, expected_energies = _chan_vese_runs(backend, image, **options)
        if len(energies[index]) != len(expected_energies) or _differing(segmentation[index], expected_segmentation):
            return float("inf")
        errors.append(relative_error(phi[index], expected_phi))
    return max(errors)
