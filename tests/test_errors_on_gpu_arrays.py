"""Bad arguments to the level-set and semi-convolutional ops raise the same exception, with the
same message naming the argument, on CuPy arrays (both GPU kernel sets) as on NumPy arrays; and
the ops' drivers leave CuPy inputs unchanged. Checked without a GPU through the stand-ins of
tests/fake_cupy.py (kernels do not run there: the checks all happen before any launch)."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

import pydeform
from fake_cupy import fake_gpu  # noqa: F401 (a fixture)

SNAKES = {"acwe": ("morphological_chan_vese", "image"), "gac": ("morphological_geodesic_active_contour", "gimage")}
Z = np.zeros

#: (id, image, init_level_set (None: the default), keywords, exception, argument named (None: the image's))
SNAKE_RULES = [
    ("1d", Z(5), Z(5), {}, ValueError, None),
    ("4d", Z((2, 3, 4, 5)), Z((2, 3, 4, 5)), {}, ValueError, None),
    ("ndim-mismatch", Z((4, 5)), Z((4, 5, 1)), {}, ValueError, "init_level_set"),
    ("3d-image-2d-init", Z((10, 10, 3)), Z((10, 9)), {}, ValueError, "init_level_set"),
    ("unknown-init", Z((4, 5)), "square", {}, ValueError, "init_level_set"),
    ("complex-image", Z((4, 5), complex), None, {}, TypeError, None),
    ("complex-init", Z((4, 5)), Z((4, 5), complex), {}, TypeError, "init_level_set"),
    ("batched-2d", Z((4, 5)), None, {"batched": True}, ValueError, None),
    ("batched-init-shape", Z((2, 4, 5)), Z((3, 4, 5)), {"batched": True}, ValueError, "init_level_set"),
    ("phase", Z((4, 5)), None, {"phase": 2}, ValueError, "phase"),
    ("num-iter", Z((4, 5)), None, {"num_iter": -1}, ValueError, "num_iter"),
    ("smoothing", Z((4, 5)), None, {"smoothing": 1.5}, TypeError, "smoothing"),
    ("empty-image", Z((0, 3)), None, {}, ValueError, None),
    # scikit-image raises for a size-1 axis too (np.gradient needs 2 elements)
    *((f"size-1-axis-{shape}", Z(shape), None, {}, ValueError, None) for shape in [(1, 5), (5, 1), (1, 3, 3),
                                                                                    (3, 3, 1)]),
]


def _snake_call(name, image, init, keywords):
    def call(a, ops):
        keywords_ = {"num_iter": 1, **keywords}
        if init is not None:
            keywords_["init_level_set"] = a(init) if isinstance(init, np.ndarray) else init
        return getattr(ops, name)(a(image), **keywords_)

    return call


def _level_set_cases():
    """{id: (call(a, ops), exception, argument named)}: ``a`` puts a NumPy array on the library
    under test, ``ops`` holds the pydeform ops to call."""
    cases = {}
    for short, (name, image_name) in SNAKES.items():
        for rule, image, init, keywords, exception, argument in SNAKE_RULES:
            cases[f"{short}-{rule}"] = (_snake_call(name, image, init, keywords), exception, argument or image_name)
    cases.update({
        "gac-threshold": (lambda a, ops: ops.morphological_geodesic_active_contour(a(np.ones((4, 5))), 1,
                                                                                   threshold="median"),
                          ValueError, "threshold"),
        "chan-vese-3d": (lambda a, ops: ops.chan_vese(a(Z((10, 10, 3))), init_level_set=a(Z((10, 9)))), ValueError,
                         "image"),
        "chan-vese-init-shape": (lambda a, ops: ops.chan_vese(a(Z((10, 10))), init_level_set=a(Z((10, 9)))),
                                 ValueError, "init_level_set"),
        "chan-vese-unknown-init": (lambda a, ops: ops.chan_vese(a(Z((10, 10))), init_level_set="a"), ValueError,
                                   "init_level_set"),
        "chan-vese-dt": (lambda a, ops: ops.chan_vese(a(Z((4, 4))), dt=np.nan), ValueError, "dt"),
        "sup-inf-1d": (lambda a, ops: ops.sup_inf(a(Z(5))), ValueError, "u"),
        "inf-sup-4d": (lambda a, ops: ops.inf_sup(a(Z((2, 2, 2, 2)))), ValueError, "u"),
        "inverse-gaussian-gradient-complex": (lambda a, ops: ops.inverse_gaussian_gradient(a(Z((4, 4), complex))),
                                              TypeError, "image"),
    })
    return cases


PSI = np.zeros((2, 3, 4, 5), np.float32)
LABELS = np.ones((2, 4, 5), np.int64)
FOREGROUND = np.ones((2, 4, 5), bool)
CENTERS = np.zeros((2, 2, 3), np.float32)
SCORES = np.zeros((2, 4, 5), np.float32)


def _semiconv_cases():
    return {
        "labels-above-K": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS * 3), 2), ValueError, "labels"),
        "labels-negative": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(-LABELS), 2), ValueError, "labels"),
        "labels-means-above-K": (lambda a, ops: ops.instance_means(a(PSI), a(LABELS * 3), 2), ValueError, "labels"),
        "labels-backward-above-K": (lambda a, ops: ops.instance_mean_loss_backward(1.0, a(PSI), a(LABELS * 3), 2),
                                    ValueError, "labels"),
        "labels-float": (lambda a, ops: ops.instance_means(a(PSI), a(LABELS.astype(np.float32)), 2), TypeError,
                         "labels"),
        "labels-bool": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS.astype(bool)), 2), TypeError,
                        "labels"),
        "labels-shape": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS[:, :3]), 2), ValueError, "labels"),
        "num-instances-0": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS), 0), ValueError,
                            "num_instances"),
        "reduction": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS), 2, "avg"), ValueError, "reduction"),
        "loss-coordinates-d1": (lambda a, ops: ops.instance_mean_loss(a(PSI[:, :1]), a(LABELS), 2,
                                                                      coordinates=True), ValueError, "psi"),
        "embed-d1": (lambda a, ops: ops.semiconv_embed(a(PSI[:, :1])), ValueError, "phi"),
        "affinity-coordinates-d1": (lambda a, ops: ops.affinity(a(PSI[:, :1]), a(CENTERS[:, :, :1]), 1.0,
                                                                coordinates=True), ValueError, "psi"),
        "votes-d1": (lambda a, ops: ops.hough_votes(a(PSI[:, :1]), a(FOREGROUND)), ValueError, "psi"),
        "psi-3d": (lambda a, ops: ops.instance_mean_loss(a(PSI[0]), a(LABELS), 2), ValueError, "psi"),
        "grad-output-shape": (lambda a, ops: ops.instance_mean_loss_backward(a(np.ones(3, np.float32)), a(PSI),
                                                                             a(LABELS), 2), ValueError, "grad_output"),
        "sigma-zero": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), 0.0), ValueError, "sigma"),
        "sigma-negative": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), -1.0), ValueError, "sigma"),
        "sigma-array-negative": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), a(-np.ones((2, 2), np.float32))),
                                 ValueError, "sigma"),
        "sigma-array-nan": (lambda a, ops: ops.seeded_mask_logits(a(SCORES), a(PSI), a(np.full(2, np.nan,
                                                                                               np.float32))),
                            ValueError, "sigma"),
        "sigma-shape": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), a(np.ones((2, 3), np.float32))), ValueError,
                        "sigma"),
        "sigma-dtype": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), a(np.ones((2, 2)))), TypeError, "sigma"),
        "centers-shape": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS[:, :, :2]), 1.0), ValueError, "centers"),
        "assign-centers-shape": (lambda a, ops: ops.assign_to_centers(a(PSI), a(FOREGROUND), a(CENTERS[:1])),
                                 ValueError, "centers"),
        "kernel": (lambda a, ops: ops.affinity(a(PSI), a(CENTERS), 1.0, "cauchy"), ValueError, "kernel"),
        "scores-shape": (lambda a, ops: ops.seeded_mask_logits(a(SCORES[:, :, :4]), a(PSI), 1.0), ValueError,
                         "scores"),
        "mode": (lambda a, ops: ops.seeded_mask_logits(a(SCORES), a(PSI), 1.0, "max"), ValueError, "mode"),
        "foreground-dtype": (lambda a, ops: ops.hough_votes(a(PSI), a(FOREGROUND.astype(np.uint8))), TypeError,
                             "foreground"),
        "foreground-shape": (lambda a, ops: ops.assign_to_centers(a(PSI), a(FOREGROUND[:1]), a(CENTERS)),
                             ValueError, "foreground"),
        "votes-shape": (lambda a, ops: ops.hough_votes(a(PSI), a(FOREGROUND), (0, 3)), ValueError, "shape"),
        "max-distance": (lambda a, ops: ops.assign_to_centers(a(PSI), a(FOREGROUND), a(CENTERS), -1.0), ValueError,
                         "max_distance"),
        "peaks-dtype": (lambda a, ops: ops.hough_peaks(a(np.zeros((2, 4, 5), np.int64)), 3), TypeError, "votes"),
        "peaks-min-votes": (lambda a, ops: ops.hough_peaks(a(np.zeros((2, 4, 5), np.int32)), 3, min_votes=0),
                            ValueError, "min_votes"),
        "spacing": (lambda a, ops: ops.instance_mean_loss(a(PSI), a(LABELS), 2, coordinates=True,
                                                          spacing=(1.0, np.inf)), ValueError, "spacing"),
    }


CASES = {**_level_set_cases(), **_semiconv_cases()}
# every op above but inverse_gaussian_gradient (SciPy / cupyx.scipy decide) takes backend=
OPS = ("morphological_chan_vese", "morphological_geodesic_active_contour", "chan_vese", "sup_inf", "inf_sup",
       "semiconv_embed", "instance_means", "instance_mean_loss", "instance_mean_loss_backward", "affinity",
       "affinity_backward", "seeded_mask_logits", "seeded_mask_logits_backward", "hough_votes", "hough_peaks",
       "assign_to_centers")


def ops_with(backend):
    """pydeform's ops with ``backend=`` given."""
    ops = types.SimpleNamespace(inverse_gaussian_gradient=pydeform.inverse_gaussian_gradient)
    for name in OPS:
        setattr(ops, name, functools.partial(getattr(pydeform, name), backend=backend))
    return ops


@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("case", CASES)
def test_gpu_arrays_raise_as_numpy_arrays(fake_gpu, case, backend):
    call, exception, argument = CASES[case]
    with pytest.raises(exception) as on_cpu:
        call(np.asarray, ops_with(None))
    assert str(on_cpu.value).startswith(f"{argument}:"), on_cpu.value
    with pytest.raises(exception) as on_gpu:
        call(fake_gpu.asarray, ops_with(backend))
    assert str(on_gpu.value) == str(on_cpu.value)
    launches = [event for event in fake_gpu.events if "launch" in event[0]]
    assert not launches, "an op launched kernels before checking its arguments"


def _every_op(a, ops):
    """Each level-set and semi-convolutional op once on the inputs ``a`` makes (a dict name ->
    array, every array an op reads)."""
    ops.morphological_chan_vese(a["image"], 2, a["init"], batched=True, iter_callback=lambda u: None)
    ops.morphological_geodesic_active_contour(a["image"], 2, a["init"][0], balloon=1, batched=True)
    ops.chan_vese(a["image"], max_num_iter=2, init_level_set=a["init"], extended_output=True, batched=True)
    ops.sup_inf(a["init"][0])
    ops.inf_sup(a["init"][0])
    options = dict(coordinates=True, spacing=(0.5, 2.0))
    ops.semiconv_embed(a["psi"])
    ops.instance_means(a["psi"], a["labels"], 2, **options)
    ops.instance_mean_loss(a["psi"], a["labels"], 2, **options)
    ops.instance_mean_loss_backward(a["grad_loss"], a["psi"], a["labels"], 2, "none", **options)
    ops.affinity(a["psi"], a["centers"], a["sigma"], **options)
    ops.affinity_backward(a["grad_affinity"], a["psi"], a["centers"], a["sigma"], **options)
    ops.seeded_mask_logits(a["scores"], a["psi"], a["sigma"][:, 0], "softmax", **options)
    ops.seeded_mask_logits_backward(a["scores"], a["scores"], a["psi"], a["sigma"][:, 0], **options)
    ops.hough_votes(a["psi"], a["foreground"], **options)
    ops.hough_peaks(a["votes"], 2)
    ops.assign_to_centers(a["psi"], a["foreground"], a["centers"], **options)


@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_gpu_inputs_are_unchanged(fake_gpu, backend):
    rng = np.random.default_rng(0)
    inputs = {"image": rng.integers(0, 9, (2, 4, 5)).astype(np.float64), "init": rng.standard_normal((2, 4, 5)),
              "psi": rng.normal(size=(2, 3, 4, 5)).astype(np.float32), "labels": rng.integers(0, 3, (2, 4, 5)),
              "grad_loss": np.ones((2, 2), np.float32), "centers": rng.normal(size=(2, 2, 3)).astype(np.float32),
              "sigma": np.full((2, 2), 0.5, np.float32), "grad_affinity": np.ones((2, 2, 4, 5), np.float32),
              "scores": rng.normal(size=(2, 4, 5)).astype(np.float32), "foreground": rng.random((2, 4, 5)) < 0.5,
              "votes": rng.integers(0, 3, (2, 4, 5)).astype(np.int32)}
    on_gpu = {name: fake_gpu.asarray(array) for name, array in inputs.items()}
    _every_op(on_gpu, ops_with(backend))
    for name, array in inputs.items():
        np.testing.assert_array_equal(fake_gpu.asnumpy(on_gpu[name]), array, err_msg=name)
