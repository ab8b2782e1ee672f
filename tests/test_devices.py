"""Which GPU the public ops run on, checked without a GPU through the stand-ins of
tests/fake_cupy.py: arrays made on GPU 1 and passed while GPU 0 is current get their outputs,
scratch and launches on GPU 1, with both GPU kernel sets; the Numba CUDA kernels launch in
Numba's context of GPU 1 on CuPy's current stream there. tests/test_gpu_devices.py runs ops on
a second real GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pydeform
from fake_cupy import STREAM_BASE, fake_gpu  # noqa: F401 (a fixture)
from tests.centernet_cases import build_decode_case, build_focal_case, build_targets_case
from tests.deform_unet_cases import pool_case_from, transpose_case_from
from tests.strategies import ROI_OPS, build_case, build_roi_case


def _cases():
    """``{op name: (case, run(case, backend))}`` for every public op, on tiny NumPy arrays."""
    rng = np.random.default_rng(0)
    conv = build_case(rng, n=1, channels=2, out_channels=2, size=(4, 4), kernel=(2, 2), dtype=np.float32)
    cases = {
        "deform_conv2d": (conv, lambda c, backend: pydeform.deform_conv2d(**c.arguments(), backend=backend)),
        "deform_conv2d_backward": (conv, lambda c, backend: pydeform.deform_conv2d_backward(
            c.grad_output, **c.arguments(), backend=backend)),
    }
    transpose = transpose_case_from(conv, rng)
    pool = pool_case_from(conv, "avg", rng)
    cases.update(
        deform_conv_transpose2d=(transpose, lambda c, backend: pydeform.deform_conv_transpose2d(
            **c.arguments(), backend=backend)),
        deform_conv_transpose2d_backward=(transpose, lambda c, backend: pydeform.deform_conv_transpose2d_backward(
            c.grad_output, **c.arguments(), backend=backend)),
        deform_pool2d=(pool, lambda c, backend: pydeform.deform_pool2d(**c.arguments(), backend=backend)),
        deform_pool2d_backward=(pool, lambda c, backend: pydeform.deform_pool2d_backward(
            c.grad_output, **c.arguments(), backend=backend)),
    )
    roi_options = {
        "roi_align": dict(channels=2, output_size=2),
        "ps_roi_align": dict(channels=4, output_size=2),
        "roi_pool": dict(channels=2, output_size=2),
        "ps_roi_pool": dict(channels=4, output_size=2),
        "deform_roi_pool": dict(channels=2, output_size=2, offset=rng.standard_normal((2, 2, 2, 2))),
        "deform_psroi_pool": dict(channels=4, group_size=2, pooled_size=2, trans=rng.standard_normal((2, 2, 2, 2))),
    }
    for op in ROI_OPS:
        case = build_roi_case(op, rng, kinds=("inside", "straddling"), **roi_options[op])
        cases[op] = (case, lambda c, backend: c.forward(pydeform, backend=backend))
        cases[op + "_backward"] = (case, lambda c, backend: c.backward(pydeform, backend=backend))
    focal = build_focal_case(rng, np.float32)
    cases.update(
        centernet_decode=(build_decode_case(rng, np.float32, K=4), lambda c, backend: c.run(pydeform, backend=backend)),
        centernet_targets=(build_targets_case(rng, np.float32), lambda c, backend: c.run(pydeform, backend=backend)),
        centernet_focal_loss=(focal, lambda c, backend: c.loss(pydeform, backend=backend)),
        centernet_focal_loss_backward=(focal, lambda c, backend: c.grad(pydeform, backend=backend)),
    )
    cases.update(_semiconv_cases(rng))
    cases.update(_levelset_cases(rng))
    return cases


@dataclasses.dataclass
class SemiConvCase:
    """The arrays of the semi-convolutional ops (psi [N, D, H, W] and what goes with it)."""

    psi: object
    labels: object
    centers: object
    scores: object
    foreground: object
    votes: object
    maps: object  # [N, K, H, W], the affinities' gradient

    def map_arrays(self, fn):
        return SemiConvCase(*(fn(value) for value in dataclasses.astuple(self)))


def _semiconv_cases(rng):
    n, dims, height, width, K = 2, 3, 4, 5, 2
    case = SemiConvCase(
        psi=rng.standard_normal((n, dims, height, width)).astype(np.float32),
        labels=rng.integers(0, K + 1, size=(n, height, width)).astype(np.int32),
        centers=rng.standard_normal((n, K, dims)).astype(np.float32),
        scores=rng.standard_normal((n, height, width)).astype(np.float32),
        foreground=rng.random((n, height, width)) < 0.5,
        votes=rng.integers(0, 3, size=(n, height, width)).astype(np.int32),
        maps=rng.standard_normal((n, K, height, width)).astype(np.float32),
    )
    runs = {
        "semiconv_embed": lambda c, backend: pydeform.semiconv_embed(c.psi, backend=backend),
        "instance_means": lambda c, backend: pydeform.instance_means(c.psi, c.labels, K, backend=backend),
        "instance_mean_loss": lambda c, backend: pydeform.instance_mean_loss(c.psi, c.labels, K, backend=backend),
        "instance_mean_loss_backward": lambda c, backend: pydeform.instance_mean_loss_backward(
            1.0, c.psi, c.labels, K, coordinates=True, backend=backend),
        "affinity": lambda c, backend: pydeform.affinity(c.psi, c.centers, 0.5, backend=backend),
        "affinity_backward": lambda c, backend: pydeform.affinity_backward(c.maps, c.psi, c.centers, 0.5,
                                                                           backend=backend),
        "seeded_mask_logits": lambda c, backend: pydeform.seeded_mask_logits(c.scores, c.psi, 0.5, "softmax",
                                                                             backend=backend),
        "seeded_mask_logits_backward": lambda c, backend: pydeform.seeded_mask_logits_backward(
            c.scores, c.scores, c.psi, 0.5, backend=backend),
        "hough_votes": lambda c, backend: pydeform.hough_votes(c.psi, c.foreground, coordinates=True,
                                                               backend=backend),
        "hough_peaks": lambda c, backend: pydeform.hough_peaks(c.votes, 2, backend=backend),
        "assign_to_centers": lambda c, backend: pydeform.assign_to_centers(c.psi, c.foreground, c.centers,
                                                                           backend=backend),
    }
    return {name: (case, run) for name, run in runs.items()}


@dataclasses.dataclass
class LevelSetCase:
    """A tiny image and level set for the level-set ops (2-D, one image)."""

    image: object
    u: object

    def map_arrays(self, fn):
        return LevelSetCase(*(fn(value) for value in dataclasses.astuple(self)))


def _levelset_cases(rng):
    case = LevelSetCase(image=rng.integers(0, 4, size=(5, 6)).astype(np.float64),
                        u=(rng.random((5, 6)) < 0.5).astype(np.int8))
    runs = {
        "morphological_chan_vese": lambda c, backend: pydeform.morphological_chan_vese(
            c.image, 2, c.u, smoothing=1, backend=backend),
        "morphological_geodesic_active_contour": lambda c, backend: pydeform.morphological_geodesic_active_contour(
            c.image, 2, c.u, smoothing=1, balloon=-1, backend=backend),
        "chan_vese": lambda c, backend: pydeform.chan_vese(c.image, max_num_iter=2, backend=backend),
        "sup_inf": lambda c, backend: pydeform.sup_inf(c.u, backend=backend),
        "inf_sup": lambda c, backend: pydeform.inf_sup(c.u, backend=backend),
    }
    return {name: (case, run) for name, run in runs.items()}


CASES = _cases()
# Ops made of array operations only: they allocate on the arrays' GPU but launch no kernel of ours.
NO_KERNEL = {"semiconv_embed"}


def _on_gpu(case, to_gpu):
    if hasattr(case, "map_arrays"):
        return case.map_arrays(to_gpu)
    return dataclasses.replace(case, boxes=to_gpu(case.boxes), labels=to_gpu(case.labels))  # TargetsCase


def _arrays_in(result):
    if isinstance(result, (tuple, dict)):
        for item in (result.values() if isinstance(result, dict) else result):
            yield from _arrays_in(item)
    elif result is not None:
        yield result


# Helpers that take no array, or whose arithmetic is a library's (cupyx.scipy.ndimage's Gaussian gradient).
NOT_KERNEL_OPS = {"checkerboard_level_set", "disk_level_set", "next_phase", "inverse_gaussian_gradient"}


def test_every_public_op_is_covered():
    ops = {name for name in pydeform.__all__
           if callable(getattr(pydeform, name)) and not isinstance(getattr(pydeform, name), type)}
    assert ops - NOT_KERNEL_OPS == set(CASES)


def _check_events(fake, result, backend, stream=STREAM_BASE + 1, launches_expected=True):
    """Every allocation and launch ``fake`` recorded, and every array of ``result``, on GPU 1;
    the launches on ``stream``."""
    allocations = [event for event in fake.events if event[0] == "allocate"]
    assert allocations and {device for _, device in allocations} == {1}, fake.events
    launches = [event for event in fake.events if event[0].endswith("launch")]
    assert bool(launches) == launches_expected, fake.events
    for event in launches:
        if backend is None:
            kind, template, compiled_for, current, launch_stream, argument_devices = event
            assert kind == "launch" and compiled_for == current == 1, event
        else:
            kind, _, numba_device, stream_device, launch_stream, current, argument_devices = event
            # Numba's own current device, the context its stream belongs to, CuPy's stream there.
            assert kind == "numba launch" and numba_device == stream_device == current == 1, event
        assert launch_stream == stream and set(argument_devices) == {1}, event
    assert {array.device.id for array in _arrays_in(result)} == {1}


@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_an_op_allocates_and_launches_on_its_arrays_gpu(fake_gpu, op, backend):
    case, run = CASES[op]
    with fake_gpu.cuda.Device(1):
        case = _on_gpu(case, fake_gpu.asarray)
    fake_gpu.events.clear()
    result = run(case, backend)
    assert fake_gpu.current == 0, "the caller's current device was not restored"
    _check_events(fake_gpu, result, backend, launches_expected=op not in NO_KERNEL)


@pytest.mark.parametrize("backend", [None, "numba"])
def test_an_op_keeps_the_stream_its_caller_made_current(fake_gpu, backend):
    """As pydeform.torch and pydeform.jax run an op: inside a block that makes the arrays' GPU
    and a stream of theirs (PyTorch's current stream, XLA's stream) CuPy's current ones."""
    case, run = CASES["roi_align_backward"]
    with fake_gpu.cuda.Device(1):
        case = _on_gpu(case, fake_gpu.asarray)
        fake_gpu.events.clear()
        with fake_gpu.cuda.ExternalStream(0xABC, 1):
            result = run(case, backend)
    _check_events(fake_gpu, result, backend, stream=0xABC)
