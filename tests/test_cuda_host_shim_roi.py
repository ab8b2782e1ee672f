"""The CuPy RawKernel sources of the RoI family (roi.cu), run on the CPU through the host shim
(tests/host_shim.py), against the float64 NumPy reference in float32 and float64.

The public ops run with the shim as their kernel set (the "roi" registry lookup patched), so
argument checks, rois normalisation and gradient allocation run around the CUDA code exactly as
on a GPU. Every kernel call goes through CheckedKernels: outputs are poisoned with NaN first and
must be fully written, gradients must arrive zero-filled and leave finite, no input may change.
"""

import contextlib
import inspect
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
import pydeform.roi as roi_module
import reference
from pydeform.backends.cupy_kernels.roi import KERNELS, CupyRoIKernels
from pydeform.roi import DeformPSRoIPoolParams, DeformRoIPoolParams, RoIAlignParams, RoIPoolParams
from tests import host_shim
from tests.roi_kernel_set_checks import check_max_modes_propagate_nan
from tests.strategies import assert_close

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

# The host shim instantiates the kernels for float and double only.
DTYPES = (np.float32, np.float64)
OPS = ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")
# Array arguments a kernel method writes: `output` is written in full, the gradients (all but
# grad_output) are accumulated into.
OUTPUT = "output"


def is_gradient(name):
    return name.startswith("grad_") and name != "grad_output"


class CheckedKernels:
    """Wraps a RoI kernel set: each method call poisons `output` with NaN, requires zero-filled
    gradients, checks afterwards that every element of both is finite and that no other array
    changed, and is recorded in `calls`."""

    def __init__(self, kernels):
        self._kernels = kernels
        self.xp = kernels.xp
        self.calls = []

    def __getattr__(self, method):
        run = getattr(self._kernels, method)
        names = list(inspect.signature(run).parameters)

        def checked(*args):
            arrays = {n: a for n, a in zip(names, args) if isinstance(a, np.ndarray)}
            for name, array in arrays.items():
                assert array.flags.c_contiguous, f"{method}: {name} is not C-contiguous"
                if is_gradient(name):
                    assert not array.any(), f"{method}: {name} is not zero-filled"
            if OUTPUT in arrays:
                arrays[OUTPUT].fill(np.nan)
            inputs = {n: a.copy() for n, a in arrays.items() if n != OUTPUT and not is_gradient(n)}
            run(*args)
            for name, before in inputs.items():
                assert np.array_equal(arrays[name], before, equal_nan=True), f"{method} wrote its input {name}"
            for name, array in arrays.items():
                if name == OUTPUT or is_gradient(name):
                    unwritten = np.count_nonzero(~np.isfinite(array))
                    assert not unwritten, f"{method}: {unwritten} of {array.size} {name} elements not finite"
            self.calls.append(method)

        return checked


@contextlib.contextmanager
def shim_backend():
    """pydeform's RoI ops, for NumPy arrays, run the host shim's kernels; yields the kernel set."""
    kernels = CheckedKernels(host_shim.HostShimRoIKernels())
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: kernels):
        yield kernels


@dataclass(frozen=True)
class RoICase:
    """One call of a RoI op: pydeform and the reference share its name and keywords."""

    op: str
    input: np.ndarray
    rois: object  # [K, 5] array or a list of per-image [L, 4] arrays
    arrays: dict  # the offset / mask / trans given (absent ones are left out)
    options: dict
    grad_output: np.ndarray

    def forward(self, module):
        return getattr(module, self.op)(self.input, self.rois, **self.arrays, **self.options)

    def backward(self, module):
        return getattr(module, self.op + "_backward")(self.grad_output, self.input, self.rois, **self.arrays,
                                                      **self.options)


# Where a box lies relative to the feature map (coordinates after spatial_scale).
BOX_KINDS = ("inside", "straddling", "outside", "degenerate", "inverted", "huge")


def feature_box(rng, kind, height, width):
    """(x1, y1, x2, y2) in feature-map pixels, continuous values (no exact ties with the
    kinks and edges of bilinear sampling) except where the kind makes them equal."""
    def axis(size):
        if kind == "inside":
            start = rng.uniform(0, size - 0.5)
            return start, rng.uniform(start + 0.1, size)
        if kind == "straddling":
            start = rng.uniform(-3, size)
            return start, start + rng.uniform(0.5, size + 3)
        if kind == "outside":
            start = rng.choice([-1, 1]) * rng.uniform(size + 1.5, size + 5)
            return start, start + rng.uniform(0, 2)
        if kind == "degenerate":
            start = rng.uniform(-1, size)
            return start, start
        if kind == "inverted":
            start = rng.uniform(0, size)
            return start, start - rng.uniform(0.1, 3)
        return rng.uniform(-2 * size - 3, -1), rng.uniform(size + 1, 3 * size + 3)  # huge

    x1, x2 = axis(width)
    y1, y2 = axis(height)
    return np.array([x1, y1, x2, y2])


def draw_rois(draw, rng, batch, height, width, spatial_scale, max_rois, half_pixel_grid):
    """rois [K, 5] (K = 0..max_rois boxes of any kind) in input-image coordinates, float64;
    ``half_pixel_grid`` puts the scaled corners on multiples of 0.5 (rounding ties)."""
    kinds = draw(st.lists(st.sampled_from(BOX_KINDS), max_size=max_rois))
    boxes = np.array([feature_box(rng, kind, height, width) for kind in kinds]).reshape(-1, 4)
    if half_pixel_grid:
        boxes = np.round(boxes * 2) / 2
    return np.column_stack([rng.integers(0, batch, len(kinds)), boxes / spatial_scale])


def per_image_boxes(rois, batch):
    """The list form of rois [K, 5]: per image its [L, 4] boxes."""
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)]


@st.composite
def roi_cases(draw, op, dtype, max_rois=4):
    """A valid call of ``op`` with its grad_output: batch 1..2, image 1..8 x 1..8, output 1..3 per
    axis, K = 0..max_rois boxes of every kind (sometimes passed as a per-image list), the op's options
    drawn over their ranges."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, height, width = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    pooled_h, pooled_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # Power-of-two scales are exact in float32; the others round like torchvision's float scale.
    exact_scales = (1.0, 0.5, 0.25, 2.0)
    spatial_scale = draw(st.sampled_from(exact_scales + (float(rng.uniform(0.2, 1.5)),)))
    output_size = (pooled_h, pooled_w) if pooled_h != pooled_w or draw(st.booleans()) else pooled_h
    # Rounding ties (x.5 after scaling) are exact in float32 with the power-of-two scales.
    half_pixel_grid = op in ("roi_pool", "ps_roi_pool") and spatial_scale in exact_scales and draw(st.booleans())
    rois = draw_rois(draw, rng, batch, height, width, spatial_scale, max_rois, half_pixel_grid)
    k = len(rois)
    arrays, options = {}, {"output_size": output_size, "spatial_scale": spatial_scale}
    channels = channels_out = draw(st.integers(1, 3))
    if op in ("ps_roi_align", "ps_roi_pool"):
        channels = channels_out * pooled_h * pooled_w
    if op in ("roi_align", "ps_roi_align", "deform_roi_pool"):
        options["sampling_ratio"] = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    if op == "roi_align":
        options["aligned"] = draw(st.booleans())
        options["mode"] = draw(st.sampled_from(["avg", "max"]))
    if op == "deform_roi_pool":
        options["gamma"] = draw(st.sampled_from([0.1, 0.5, -0.3]))
        if draw(st.booleans()):
            arrays["offset"] = rng.standard_normal((k, 2, pooled_h, pooled_w))
        if draw(st.booleans()):
            arrays["mask"] = rng.uniform(-0.5, 1.5, (k, 1, pooled_h, pooled_w))
    if op == "deform_psroi_pool":
        group_size, pooled_h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        pooled_w = pooled_h
        part_size = draw(st.sampled_from([None, 0, 1, 2, 3]))
        classes = draw(st.integers(1, 2))
        channels_out = classes * draw(st.integers(1, 2))
        channels = channels_out * group_size**2
        options = {
            "output_dim": draw(st.sampled_from([None, channels_out])), "group_size": group_size,
            "pooled_size": pooled_h, "part_size": part_size, "sample_per_part": draw(st.integers(1, 3)),
            "trans_std": draw(st.sampled_from([0.0, 0.1, 0.5])), "spatial_scale": spatial_scale,
        }
        # The box is rounded to whole pixels, so without a shift samples can fall exactly on the
        # skip edges -0.5 and size - 0.5 (round(x1) * scale cancels against the bin offsets), where
        # float32 rounding legitimately decides otherwise than the float64 reference (itself an ulp
        # either side there). float32 cases always shift; the shift-free path is the same code.
        shifted = dtype == np.float32
        if shifted:
            options["trans_std"] = draw(st.sampled_from([0.1, 0.5]))
        if shifted or draw(st.booleans()):
            parts = part_size or pooled_h
            arrays["trans"] = rng.standard_normal((k, 2 * classes, parts, parts))
        if draw(st.booleans()):
            # The op rounds the raw corners: put them on x.5 for the rounding ties.
            rois[:, 1:] = np.round(rois[:, 1:] * 2) / 2
    rois = rois.astype(dtype)
    return RoICase(
        op=op,
        input=rng.standard_normal((batch, channels, height, width)).astype(dtype),
        rois=per_image_boxes(rois, batch) if draw(st.booleans()) else rois,
        arrays={name: a.astype(dtype) for name, a in arrays.items()},
        options=options,
        grad_output=rng.standard_normal((k, channels_out, pooled_h, pooled_w)).astype(dtype),
    )


def family(op):
    """The kernel family that runs an op: position-sensitive variants are flags of their plain op."""
    return op.removeprefix("ps_")


def assert_grads_match(grads, expected, dtype):
    """A pydeform gradient record against the reference's dict (None where an argument was absent)."""
    assert set(grads._fields) == set(expected), (grads._fields, sorted(expected))
    for name, value in expected.items():
        got = getattr(grads, name)
        if value is None:
            assert got is None, f"grad {name}: expected None, got an array"
        else:
            assert got.dtype == dtype, f"grad {name}: dtype {got.dtype}"
            assert_close(f"grad {name}", got, value, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@settings(deadline=None)
@given(data=st.data())
def test_op_matches_reference(op, dtype, data):
    """Forward and backward of the public op, run by roi.cu on the host shim."""
    case = data.draw(roi_cases(op, dtype))
    with shim_backend() as kernels:
        output = case.forward(pydeform)
        grads = case.backward(pydeform)
    assert output.dtype == dtype
    assert_close("output", output, case.forward(reference), dtype)
    assert_grads_match(grads, case.backward(reference), dtype)
    ran = [f"{family(op)}_forward", f"{family(op)}_backward"] if case.grad_output.size else []
    assert kernels.calls == ran


def test_kernel_set_methods_are_the_kernels():
    """One method per forward / backward kernel template, of the same name, its deterministic
    twin per backward, and the two workspace plans (the interface of pydeform.roi); the other
    templates are the deterministic backward's steps."""
    methods = {name for name, _ in inspect.getmembers(CupyRoIKernels, inspect.isfunction) if not name.startswith("_")}
    kernels = {t for t in KERNELS.templates if t.endswith(("_forward", "_backward"))}
    deterministic = {t + "_deterministic" for t in kernels if t.endswith("_backward")}
    assert methods == kernels | deterministic | {"workspace", "deterministic_workspace"}


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=5, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_no_rois(op, dtype, data):
    """K = 0: empty outputs, zero gradients of the right shapes, no kernel launched."""
    case = data.draw(roi_cases(op, dtype, max_rois=0))
    with shim_backend() as kernels:
        output = case.forward(pydeform)
        grads = case.backward(pydeform)
    assert output.shape == case.grad_output.shape and output.dtype == dtype
    assert_grads_match(grads, case.backward(reference), dtype)
    assert not grads.input.any()
    assert kernels.calls == []


# Per family: params for an input [2, 4, 5, 6] and the shapes of its optional per-roi arrays.
FAMILY_CALLS = {
    "roi_align avg": ("roi_align", RoIAlignParams(4, 5, 6, 2, 3, 4, 0.5, 2, False, False, False), {}),
    "roi_align max": ("roi_align", RoIAlignParams(4, 5, 6, 2, 3, 4, 0.5, -1, True, True, False), {}),
    "ps_roi_align": ("roi_align", RoIAlignParams(4, 5, 6, 2, 2, 1, 0.5, 2, True, False, True), {}),
    "roi_pool": ("roi_pool", RoIPoolParams(4, 5, 6, 2, 3, 4, 0.5, False), {}),
    "ps_roi_pool": ("roi_pool", RoIPoolParams(4, 5, 6, 2, 2, 1, 0.5, True), {}),
    "deform_roi_pool": ("deform_roi_pool", DeformRoIPoolParams(4, 5, 6, 2, 3, 0.5, 0, 0.1, True, True),
                        {"offset": (2, 2, 3), "mask": (1, 2, 3)}),
    "deform_psroi_pool": ("deform_psroi_pool", DeformPSRoIPoolParams(4, 5, 6, 1, 2, 3, 3, 2, 0.1, 0.5, 1, True),
                          {"trans": (2, 3, 3)}),
}


def output_shape(params, k):
    if isinstance(params, DeformPSRoIPoolParams):
        return (k, params.output_dim, params.pooled_size, params.pooled_size)
    return (k, getattr(params, "channels_out", params.channels), params.pooled_h, params.pooled_w)


def run_family(kernels, name, params, input, rois, extras, grad_output):
    """A family's forward and backward kernel set calls; returns (output, [grad_input, grad of
    each extra])."""
    output = np.empty(output_shape(params, len(rois)), dtype=input.dtype)
    getattr(kernels, f"{name}_forward")(input, rois, *extras, output, params)
    grads = [np.zeros_like(a) for a in (input, *extras)]
    getattr(kernels, f"{name}_backward")(grad_output, input, rois, *extras, *grads, params)
    return output, grads


@pytest.mark.parametrize("call", FAMILY_CALLS)
def test_batch_index_outside_the_batch_reads_nothing(call):
    """Called directly, past pydeform's validation: rois whose batch index is outside [0, N) or
    not a number give 0 and no gradient, and read nothing (image 0, where a truncated or clamped
    index would land, is NaN); the one valid roi gives what it gives alone."""
    name, params, extra_shapes = FAMILY_CALLS[call]
    rng = np.random.default_rng(3)
    input = rng.standard_normal((2, 4, 5, 6))
    input[0] = np.nan
    indices = [1.0, -1.0, -0.5, 2.0, np.nan, np.inf, -np.inf]
    rois = np.array([[index, 0.6, 0.3, 9.1, 7.7] for index in indices])
    extras = [rng.standard_normal((len(rois), *shape)) for shape in extra_shapes.values()]
    grad_output = rng.standard_normal(output_shape(params, len(rois)))
    kernels = CheckedKernels(host_shim.HostShimRoIKernels())

    output, grads = run_family(kernels, name, params, input, rois, extras, grad_output)
    alone_output, alone_grads = run_family(kernels, name, params, input, rois[:1], [e[:1] for e in extras],
                                           grad_output[:1])
    assert np.array_equal(output[:1], alone_output) and np.abs(alone_output).sum() > 0
    assert not output[1:].any()
    assert np.array_equal(grads[0], alone_grads[0]) and not grads[0][0].any()
    for grad, alone in zip(grads[1:], alone_grads[1:]):
        assert np.array_equal(grad[:1], alone) and not grad[1:].any()


def run_both(op, dtype, input, rois, grad_output, **options):
    """The op's output and gradients through the host shim, checked against the reference."""
    case = RoICase(op, input.astype(dtype), rois.astype(dtype), {}, options, grad_output.astype(dtype))
    with shim_backend():
        output = case.forward(pydeform)
        grads = case.backward(pydeform)
    assert_close("output", output, case.forward(reference), dtype)
    assert_grads_match(grads, case.backward(reference), dtype)
    return output, grads


def centred_boxes(points):
    """rois [K, 5] on image 0: 1 x 1 boxes centred on the (y, x) points."""
    return np.array([[0, x - 0.5, y - 0.5, x + 0.5, y + 0.5] for y, x in points])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_sampling_edges(mode, dtype):
    """One sample per bin, at exactly representable positions on a 4 x 3 image: rule B includes
    -1 and the size (reading the clamped border pixel) and gives 0 just beyond."""
    rng = np.random.default_rng(4)
    input = rng.uniform(1, 2, (1, 2, 4, 3))
    inside = [(-1.0, -1.0), (4.0, 3.0), (-1.0, 1.25), (2.5, 3.0)]
    beyond = [(-1.0625, 1.0), (4.0625, 1.0), (1.0, -1.0625), (1.0, 3.0625)]
    rois = centred_boxes(inside + beyond)
    output, _ = run_both("roi_align", dtype, input, rois, rng.standard_normal((8, 2, 1, 1)), output_size=1,
                         sampling_ratio=1, mode=mode)
    np.testing.assert_array_equal(output[:2, :, 0, 0], input[0][:, [0, 3], [0, 2]].T.astype(dtype))
    assert (output[:4] != 0).all() and not output[4:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_deform_psroi_pool_skip_edges(dtype):
    """One sample per bin at (round(y1) - 0.5, round(x1) - 0.5) on a 4 x 3 image: samples on the
    edges -0.5 and size - 0.5 count (reading the border pixel), samples beyond are skipped."""
    rng = np.random.default_rng(5)
    input = rng.uniform(1, 2, (1, 2, 4, 3))
    # round(x1) = 0 and 3 put x on the edges -0.5 and W - 0.5; -1 and 4 just beyond them.
    corners = [(0.0, 0.0), (4.0, 3.0), (0.4, 2.6), (-1.0, 1.0), (5.0, 1.0), (1.0, -1.0), (1.0, 4.0)]
    rois = np.array([[0, x, y, x + 2, y + 2] for y, x in corners])
    output, _ = run_both("deform_psroi_pool", dtype, input, rois, rng.standard_normal((7, 2, 1, 1)),
                         pooled_size=1, sample_per_part=1, spatial_scale=1.0)
    np.testing.assert_array_equal(output[:3, :, 0, 0], input[0][:, [0, 3, 0], [0, 2, 2]].T.astype(dtype))
    assert not output[3:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, options", [
    ("roi_align", {"mode": "avg"}), ("roi_align", {"mode": "max", "aligned": True}), ("deform_roi_pool", {}),
])
def test_adaptive_sampling_of_a_large_roi(op, options, dtype):
    """Adaptive sampling of a box far larger than the 8 x 8 image: 181 x 125 samples per bin
    (box size / bins 180.2 and 124.9, away from a whole number where float32 could round over)."""
    rng = np.random.default_rng(6)
    input = rng.standard_normal((2, 3, 8, 8))
    rois = np.array([[1, -100.2, -60.3, 149.6, 119.9], [0, -100.2, -60.3, 149.6, 119.9]])
    run_both(op, dtype, input, rois, rng.standard_normal((2, 3, 1, 2)), output_size=(1, 2), sampling_ratio=0,
             **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_ties_go_to_the_first(dtype):
    """Equal maxima: roi_align's max mode routes the gradient to the first sample in (iy, ix)
    order, roi_pool to the first pixel in row-major order."""
    rng = np.random.default_rng(7)
    input = rng.uniform(0, 1, (1, 1, 4, 4))
    input[0, 0, [1, 1, 3, 3], [1, 3, 1, 3]] = 2.0  # the 2 x 2 samples of the box below, on pixels
    box = np.array([[0, 0.0, 0.0, 4.0, 4.0]])
    grad = np.ones((1, 1, 1, 1))
    _, align = run_both("roi_align", dtype, input, box, grad, output_size=1, sampling_ratio=2, mode="max")
    _, pool = run_both("roi_pool", dtype, input, box, grad, output_size=1)
    assert np.argwhere(align.input[0, 0]).tolist() == [[1, 1]]
    assert np.argwhere(pool.input[0, 0]).tolist() == [[1, 1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, box, options", [
    ("roi_align", [1.3, 1.7, 1.3, 1.7], {"aligned": True, "mode": "max"}),
    ("roi_align", [1.3, 1.7, 0.2, 0.9], {"aligned": True, "mode": "avg"}),
    ("ps_roi_align", [1.3, 1.7, 1.3, 1.7], {}),
    ("deform_roi_pool", [2.9, 1.1, 1.0, 0.5], {}),
    ("roi_pool", [10.0, 1.0, 12.0, 2.0], {}),
    ("ps_roi_pool", [1.0, -9.0, 3.0, -5.0], {}),
])
def test_empty_bins_give_zero_and_no_gradient(op, box, options, dtype):
    """Bins without samples (adaptive sampling of a box of size <= 0) or pixels (a box off the
    image): output 0, no gradient."""
    input = np.random.default_rng(8).standard_normal((1, 4, 4, 4))
    channels_out = 1 if op.startswith("ps_") else 4
    output, grads = run_both(op, dtype, input, np.array([[0, *box]]), np.ones((1, channels_out, 2, 2)),
                             output_size=(2, 2), **options)
    assert not output.any() and not grads.input.any()


class Compute52ThreadedRoIKernels(host_shim.HostShimBlocksLaunch, CupyRoIKernels):
    """roi.cu built as for compute_52 (``__CUDA_ARCH__`` 520: double atomics through common.cuh's
    atomicCAS loop), run as 2 blocks of 8 concurrent threads."""

    manifest = KERNELS
    extra_flags = ("-D__CUDA_ARCH__=520",)
    grid = 2
    block = 8


def test_double_atomics_before_compute_60_add_up_under_contention():
    """Below compute_60 there is no atomicAdd(double*): common.cuh adds to the value it last saw
    and swaps the bits in with atomicCAS, retrying when another thread got there first. 16
    concurrent threads scatter 2000 identical rois into the same pixels and every addition must
    land (a plain read-add-write instead loses some in some runs here)."""
    rng = np.random.default_rng(9)
    input = rng.standard_normal((1, 2, 5, 5))
    rois = np.tile([[0, 0.5, 0.5, 3.5, 3.5]], (2000, 1))
    grad_output = rng.standard_normal((2000, 2, 2, 2))
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: Compute52ThreadedRoIKernels()):
        grads = pydeform.roi_align_backward(grad_output, input, rois, 2, sampling_ratio=2)
    expected = reference.roi_align_backward(grad_output, input, rois, 2, sampling_ratio=2)
    assert_close("grad input", grads.input, expected["input"], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_modes_propagate_nan(dtype):
    """roi.cu's roi_pool and roi_align max mode: NaN in a bin gives NaN, its gradient goes to the
    first NaN (the unchecked kernel set: CheckedKernels requires finite outputs)."""
    check_max_modes_propagate_nan(dtype, kernels=host_shim.HostShimRoIKernels())
