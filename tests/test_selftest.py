"""``python -m pydeform selftest`` and ``info``: run as a user would, and made to fail on purpose."""

import functools
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydeform
import reference
from pydeform import selftest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pydeform", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_quick_selftest_passes_on_numba_cpu():
    result = run_cli("selftest", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["op", "backend", "dtype", "check", "max", "error", "tolerance", "time", "result"]
    ops = {entry.op for entry in selftest.CHECKS}
    assert ops == {"deform_conv2d", "roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool",
                   "deform_psroi_pool", "centernet_decode", "centernet_targets", "centernet_focal_loss",
                   "deform_conv_transpose2d", "deform_pool2d", "morphological_chan_vese",
                   "morphological_geodesic_active_contour", "chan_vese", "sup_inf", "inf_sup",
                   "semiconv_embed", "instance_means",
                   "instance_mean_loss", "affinity", "seeded_mask_logits", "hough_votes", "hough_peaks",
                   "assign_to_centers"}
    rows = [line.split() for line in lines if line.split()[0] in ops]
    cpu_checks = [(entry.op, dtype) for entry in selftest.CHECKS
                  for dtype in ("float32", "float64") if entry.applies(selftest.NUMBA_CPU, dtype)]
    assert sorted((row[0], row[2]) for row in rows) == sorted(cpu_checks)
    assert all(row[1] == "numba-cpu" and row[-1] == "PASS" for row in rows)
    for name in ("forward vs float64", "zero offsets = convolution", "grad offset vs finite difference",
                 "affine image = affine at bin centres", "ramp image = last pixel of each bin",
                 "channel-constant input = its channels", "zero offsets = roi_align aligned",
                 "mask = unmasked * mask", "grad trans vs finite difference", "planted peaks = top-K",
                 "slots and peaks by hand", "loss = NumPy formula", "grad pred vs finite difference",
                 "zero offsets = transposed convolution", "adjoint of deform_conv2d",
                 "zero offsets = pooling of the zero-padded input", "avg = depthwise deform_conv2d",
                 "11x11 disk, balloon -1 = scikit-image's answer", "scikit-image's test cases",
                 "= largest line erosion (NumPy)", "continued at next_phase = one run", "batched = loop",
                 "= per-instance mean (NumPy)", "0 for psi constant per instance",
                 "loss and gradient bit-identical run to run", "= np.add.at of the rounded positions",
                 "= brute-force argmin", "planted peaks = their cells"):
        assert name in result.stdout
    assert "FAIL" not in result.stdout
    assert f"{len(rows)} checks passed, 0 failed" in result.stdout
    # Without a GPU both GPU backends are named as skipped, with a reason.
    backends, skipped = selftest.discover_backends()
    for name, reason in skipped.items():
        assert f"skipped backend {name}: {reason}" in result.stdout


def test_info_names_versions_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"pydeform: {pydeform.__version__}" in result.stdout
    for label in ("Python:", "numpy:", "numba:", "numba-cuda:", "CuPy:", "backend numba-cpu: usable"):
        assert label in result.stdout
    assert "GPU" in result.stdout


def test_help_lists_both_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "selftest" in result.stdout and "info" in result.stdout
    assert "--quick" in run_cli("selftest", "--help").stdout


def test_a_failing_check_fails_the_run():
    registry = []

    @selftest.check("demo_op", "always off by one", {"float32": 1e-6, "float64": 1e-6}, registry=registry)
    def off_by_one(backend, dtype, quick):
        return 1.0

    @selftest.check("demo_op", "raises", {"float32": 1e-6, "float64": 1e-6}, registry=registry)
    def raises(backend, dtype, quick):
        raise RuntimeError("kernel exploded")

    @selftest.check("demo_op", "exact", {"float64": 0.0}, applies=selftest.float64_only, registry=registry)
    def exact(backend, dtype, quick):
        return 0.0

    out = io.StringIO()
    status = selftest.run_selftest(checks=registry, backends=[selftest.NUMBA_CPU], skipped={}, out=out)
    text = out.getvalue()
    assert status == 1
    rows = [line.split() for line in text.splitlines() if line.startswith("demo_op")]
    assert [row[-1] for row in rows] == ["FAIL", "FAIL", "FAIL", "FAIL", "PASS"]
    assert "RuntimeError: kernel exploded" in text
    assert "1 checks passed, 4 failed" in text


def test_a_passing_registry_exits_zero():
    registry = []
    selftest.check("demo_op", "exact", {"float32": 0.0, "float64": 0.0}, registry=registry)(
        lambda backend, dtype, quick: 0.0
    )
    out = io.StringIO()
    assert selftest.run_selftest(checks=registry, backends=[selftest.NUMBA_CPU], skipped={}, out=out) == 0


def test_numpy_helpers_agree():
    """The two NumPy formulations the selftest checks against agree at zero offsets."""
    case, arrays, _ = next(selftest.deform_conv.DEFORM_CONV.cases(quick=True))
    arrays["offset"] = np.zeros_like(arrays["offset"])
    arrays["mask"] = np.ones_like(arrays["mask"])
    gathered = selftest.deform_conv.whole_pixel_deform_conv2d(**arrays, **case.options())
    convolved = selftest.deform_conv.ordinary_conv2d(arrays["input"], arrays["weight"], arrays["bias"], **case.options())
    np.testing.assert_allclose(gathered, convolved, rtol=1e-12, atol=1e-12)


def patch_everywhere(monkeypatch, name, value):
    """Replace ``name`` in every module of the selftest package that has it (the family modules
    import the shared helpers from selftest.common)."""
    modules = [module for module_name, module in sorted(sys.modules.items())
               if module_name.startswith("pydeform.selftest.") and hasattr(module, name)]
    assert modules
    for module in modules:
        monkeypatch.setattr(module, name, value)


def reference_forward(calls, backend, dtype, case, arrays):
    """run_forward of the selftest on the test suite's float64 reference instead of the op."""
    return getattr(reference, calls.op)(**arrays, **case.options())


def reference_backward(calls, backend, dtype, case, arrays, grad_output):
    grads = getattr(reference, f"{calls.op}_backward")(grad_output, **arrays, **case.options())
    return {name: g for name, g in grads.items() if g is not None}


ROI_OPS = ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")


def test_roi_checks_hold_for_the_reference(monkeypatch):
    """The RoI checks' own NumPy answers (affine, ramp and channel-constant images, the deform
    identities) and their finite-difference set-up (samples placed off the kinks) are right
    independently of pydeform: run on the test suite's float64 reference instead of an op, every
    check passes."""

    patch_everywhere(monkeypatch, "run_forward", reference_forward)
    patch_everywhere(monkeypatch, "run_backward", reference_backward)
    checks = [entry for entry in selftest.CHECKS
              if entry.op in ROI_OPS and entry.applies(selftest.NUMBA_CPU, "float64")]
    assert {entry.op for entry in checks} == set(ROI_OPS)
    for entry in checks:
        assert entry.run(selftest.NUMBA_CPU, "float64", False) <= entry.tolerance["float64"], (entry.op, entry.name)


@pytest.mark.parametrize("op", ROI_OPS)
def test_roi_identity_checks_notice_a_wrong_answer(monkeypatch, op):
    """Each RoI identity check with a NumPy answer fails when the op's output is off (here:
    scaled by 1.01); "mask = unmasked * mask" compares two runs of the op, which the same scaling
    leaves equal."""
    original = selftest.common.run_forward

    def off_forward(calls, backend, dtype, case, arrays):
        output = original(calls, backend, dtype, case, arrays)
        return output * 1.01 if calls.op == op else output

    patch_everywhere(monkeypatch, "run_forward", off_forward)
    identities = [entry for entry in selftest.CHECKS
                  if entry.op == op and " = " in entry.name and entry.name != "mask = unmasked * mask"]
    assert identities
    for entry in identities:
        assert entry.run(selftest.NUMBA_CPU, "float64", True) > entry.tolerance["float64"], entry.name


CENTERNET_FUNCTIONS = {
    "centernet_decode": ("centernet_decode", "planted peaks = top-K"),
    "centernet_targets": ("centernet_targets", "slots and peaks by hand"),
    "centernet_focal_loss": ("centernet_focal_loss", "loss = NumPy formula"),
    "centernet_focal_loss_backward": ("centernet_focal_loss", "grad pred vs finite difference"),
}


@pytest.mark.parametrize("function", CENTERNET_FUNCTIONS)
def test_centernet_checks_notice_a_wrong_answer(monkeypatch, function):
    """The CenterNet checks with answers worked out in NumPy pass, and fail once the op's float
    results are off by 1% (detection boxes, target maps and slots, the loss, its gradient)."""
    op, name = CENTERNET_FUNCTIONS[function]
    (entry,) = [entry for entry in selftest.CHECKS if entry.op == op and entry.name == name]
    assert entry.run(selftest.NUMBA_CPU, "float64", True) <= entry.tolerance["float64"]
    original = getattr(selftest.centernet, function)

    def off(*args, **kwargs):
        result = original(*args, **kwargs)
        if function == "centernet_decode":
            result[..., :4] *= 1.01
            return result
        if function == "centernet_targets":
            return type(result)(result.heatmap * 1.01, result.wh * 1.01, *result[2:])
        return np.asarray(result * 1.01)  # 0-d stays an array

    monkeypatch.setattr(selftest.centernet, function, off)
    assert entry.run(selftest.NUMBA_CPU, "float64", True) > entry.tolerance["float64"]


DEFORM_UNET_OPS = ("deform_conv_transpose2d", "deform_pool2d")


def test_deform_unet_checks_hold_for_the_reference(monkeypatch):
    """The Deformable U-Net checks' NumPy answers (transposed convolution, pooling of the
    zero-padded input, the depthwise deform_conv2d twin) and their finite-difference set-up hold
    for the test suite's float64 reference in place of the ops."""

    patch_everywhere(monkeypatch, "run_forward", reference_forward)
    patch_everywhere(monkeypatch, "run_backward", reference_backward)
    monkeypatch.setattr(selftest.deform_unet, "deform_conv_transpose2d",
                        lambda *args, backend=None, **kwargs: reference.deform_conv_transpose2d(*args, **kwargs))
    checks = [entry for entry in selftest.CHECKS
              if entry.op in DEFORM_UNET_OPS and entry.applies(selftest.NUMBA_CPU, "float64")]
    assert {entry.op for entry in checks} == set(DEFORM_UNET_OPS) and len(checks) == 12
    for entry in checks:
        assert entry.run(selftest.NUMBA_CPU, "float64", False) <= entry.tolerance["float64"], (entry.op, entry.name)


@pytest.mark.parametrize("op", DEFORM_UNET_OPS)
def test_deform_unet_identity_checks_notice_a_wrong_answer(monkeypatch, op):
    """Each closed-form check of the two ops fails when the op's output is off by 1%."""
    original_forward = selftest.common.run_forward
    original_transpose = selftest.deform_unet.deform_conv_transpose2d

    def off_forward(calls, backend, dtype, case, arrays):
        output = original_forward(calls, backend, dtype, case, arrays)
        return output * 1.01 if calls.op == op else output

    patch_everywhere(monkeypatch, "run_forward", off_forward)
    if op == "deform_conv_transpose2d":
        monkeypatch.setattr(selftest.deform_unet, "deform_conv_transpose2d",
                            lambda *args, **kwargs: original_transpose(*args, **kwargs) * 1.01)
    identities = [entry for entry in selftest.CHECKS if entry.op == op and " vs " not in entry.name]
    assert len(identities) == 2
    for entry in identities:
        assert entry.run(selftest.NUMBA_CPU, "float64", True) > entry.tolerance["float64"], entry.name


LEVEL_SET_OPS = ("morphological_chan_vese", "morphological_geodesic_active_contour", "chan_vese", "sup_inf", "inf_sup")


def _call_off(function, wrong_call):
    """``function`` whose call number ``wrong_call`` (from 0) returns a result with one pixel
    flipped (and phi scaled by 1 + 1e-6 for Chan-Vese's extended output); the other calls are
    left alone, so checks comparing two runs of the op see a difference too."""
    calls = []

    @functools.wraps(function)
    def off(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(None)
        if len(calls) != wrong_call + 1:
            return result
        if isinstance(result, tuple):
            return type(result)(off_by_a_pixel(result.segmentation), result.phi * (1 + 1e-6), result.energies)
        return off_by_a_pixel(result)

    return off


def off_by_a_pixel(array):
    flipped = array.copy()
    flipped.reshape(-1)[0] = not flipped.reshape(-1)[0]
    return flipped


@pytest.mark.parametrize("entry", [entry for entry in selftest.CHECKS if entry.op in LEVEL_SET_OPS],
                         ids=lambda entry: f"{entry.op}: {entry.name}")
def test_level_set_checks_notice_a_wrong_answer(monkeypatch, entry):
    """Every level-set check (its GPU-only ones run here on the Numba CPU backend against
    itself) passes, and fails once one result of the op in the check is one pixel off: the
    first, or for the continued run the second half (the snake smooths away a pixel flipped in
    the first half)."""
    dtype = "float64" if "float64" in entry.tolerance else "float32"
    assert entry.run(selftest.NUMBA_CPU, dtype, True) <= entry.tolerance[dtype]
    wrong_call = 1 if entry.name == "continued at next_phase = one run" else 0
    for name in LEVEL_SET_OPS:
        monkeypatch.setattr(selftest.levelset, name, _call_off(getattr(selftest.levelset, name), wrong_call))
    assert entry.run(selftest.NUMBA_CPU, dtype, True) > entry.tolerance[dtype]
SEMICONV_OPS = ("semiconv_embed", "instance_means", "instance_mean_loss", "affinity", "seeded_mask_logits",
                "hough_votes", "hough_peaks", "assign_to_centers")
# The functions the semiconv checks call, with a float64 reference (hough_peaks is CenterNet's
# decode: pydeform's own on the CPU).
SEMICONV_FUNCTIONS = ("semiconv_embed", "instance_means", "instance_mean_loss", "instance_mean_loss_backward",
                      "affinity", "affinity_backward", "seeded_mask_logits", "seeded_mask_logits_backward",
                      "hough_votes", "assign_to_centers")


def semiconv_reference(name):
    """The test suite's float64 reference of ``name`` called as the selftest calls pydeform's."""

    def call(*args, backend=None, **kwargs):
        if "num_instances" in kwargs:
            kwargs["K"] = kwargs.pop("num_instances")
        result = getattr(reference, name)(*args, **kwargs)
        if name == "instance_means":
            return pydeform.InstanceMeans(*result)
        return tuple(map(np.asarray, result)) if isinstance(result, tuple) else np.asarray(result)

    return call


def test_semiconv_checks_hold_for_the_reference(monkeypatch):
    """The semiconv checks' NumPy answers (per-instance means and losses, the formulas, the
    votes, the argmin) and their finite-difference set-up hold for the test suite's float64
    reference in place of the ops."""
    for name in SEMICONV_FUNCTIONS:
        monkeypatch.setattr(selftest.semiconv, name, semiconv_reference(name))
    checks = [entry for entry in selftest.CHECKS
              if entry.op in SEMICONV_OPS and entry.applies(selftest.NUMBA_CPU, "float64")]
    assert {entry.op for entry in checks} == set(SEMICONV_OPS) - {"hough_peaks"} and len(checks) == 17
    for entry in checks:
        assert entry.run(selftest.NUMBA_CPU, "float64", False) <= entry.tolerance["float64"], (entry.op, entry.name)


def off(result):
    """``result`` (an array or a NamedTuple of arrays) made wrong: floats by 1% plus 0.01, integers by one."""
    if isinstance(result, tuple):
        return type(result)(*map(off, result))
    return np.asarray(result + 1 if result.dtype.kind in "iu" else result * 1.01 + 0.01)  # 0-d stays an array


@pytest.mark.parametrize("op", SEMICONV_OPS)
def test_semiconv_checks_notice_a_wrong_answer(monkeypatch, op):
    """Each semiconv check against a NumPy answer fails once the op's results are off."""
    original = getattr(selftest.semiconv, op)
    monkeypatch.setattr(selftest.semiconv, op, lambda *args, **kwargs: off(original(*args, **kwargs)))
    identities = [entry for entry in selftest.CHECKS if entry.op == op and " vs " not in entry.name
                  and "bit-identical" not in entry.name]
    assert identities
    for entry in identities:
        dtype = "float64" if entry.applies(selftest.NUMBA_CPU, "float64") else "float32"
        assert entry.run(selftest.NUMBA_CPU, dtype, True) > entry.tolerance[dtype], entry.name


def test_semiconv_determinism_check_notices_a_changing_gradient(monkeypatch):
    original = selftest.semiconv.instance_mean_loss_backward
    calls = []

    def drifting(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs) + len(calls) * 1e-12

    monkeypatch.setattr(selftest.semiconv, "instance_mean_loss_backward", drifting)
    (entry,) = [entry for entry in selftest.CHECKS if entry.name == "loss and gradient bit-identical run to run"]
    assert entry.run(selftest.NUMBA_CPU, "float64", True) > 0
