"""The work of one RoI output element is bounded (docs/roi.md, "Bounded work"), on every backend
and the reference alike:

- ``sampling_ratio`` / ``sample_per_part`` above MAX_SAMPLES_PER_AXIS raise ``ValueError``
  before any kernel runs (the rules are in tests/test_roi_errors.py); the five calls that used
  to hang return or raise within seconds, run in a child process with a time limit so that a
  regression fails here instead of hanging the suite;
- adaptive sampling takes at most MAX_SAMPLES_PER_AXIS samples per bin and axis;
- a finite box whose corners, scaled by spatial_scale, are beyond COORDINATE_LIMIT (or overflow
  to infinity in float32) is an invalid row: 0 outputs, no gradient. Checked on the reference,
  the Numba CPU kernels and the CUDA C kernels through the host shim, the last once more built
  with UBSan's float-cast-overflow check, which must report nothing (a GPU silently saturates an
  out-of-range conversion: a sample count of LLONG_MAX, a kernel that never ends).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydeform
import reference
from pydeform._rois import COORDINATE_LIMIT, MAX_SAMPLES_PER_AXIS
from pydeform.backends.cupy_kernels._compile import KERNEL_DIR
from reference import rois as reference_rois
from tests import host_shim
from tests.strategies import ROI_OPS, RoICase, assert_close, assert_roi_grads_close
from tests.test_unchecked_values import check_invalid_rows, kernels_of

REPO = Path(__file__).resolve().parent.parent

# Boxes at spatial_scale 2. Valid: two ordinary ones and one whose scaled height, 1.66e7, is
# just within the limit (2**24 = 1.678e7): its adaptive grid is capped at 1024 rows of samples.
# Invalid: x2 * 2 overflows float32; 1e20 (adaptive sampling would ask for 1e20 samples); a
# scaled height just beyond the limit; every corner overflowing.
SCALE = 2.0
ROWS = [
    [0, 1.2, 0.7, 4.1, 5.3],
    [0, 1.0, 1.0, 3e38, 3.0],
    [1, 0.3, 2.2, 4.4, 5.1],
    [1, -1e20, 1.0, 1e20, 3.0],
    [0, 1.0, 1.0, 3.0, 8.4e6],
    [1, 1.0, 1.0, 3.0, 8.3e6],
    [1, -3e38, -3e38, 3e38, 3e38],
]
VALID_AT = [0, 2, 5]
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["float64", "float32"]


def roi_constant(name):
    match = re.search(rf"constexpr \w+(?: \w+)? {name} = ([0-9.]+);", (KERNEL_DIR / "roi.cu").read_text())
    assert match, f"{name} not found in roi.cu"
    return float(match.group(1))


def test_every_implementation_has_the_same_bounds():
    assert roi_constant("kMaxSamplesPerAxis") == MAX_SAMPLES_PER_AXIS == reference_rois.MAX_ADAPTIVE_SAMPLES
    assert roi_constant("kCoordinateLimit") == COORDINATE_LIMIT == reference_rois.COORDINATE_LIMIT == 2.0**24


# The calls of the report, each run after a warm-up that compiles the kernel the last one runs.
HANG_CASES = r"""
import json, sys, time
import numpy as np
import pydeform

x = np.ones((1, 4, 8, 8))
box = np.array([[0, 1.0, 1.0, 6.0, 6.0]])
huge = np.array([[0, 0.0, 0.0, 1e6, 1e6]])
pydeform.roi_align(x, box, 2, spatial_scale=0.5, sampling_ratio=0, aligned=True)
calls = {
    "roi_align": lambda: pydeform.roi_align(x, box, 2, sampling_ratio=10**5),
    "ps_roi_align": lambda: pydeform.ps_roi_align(x, box, 2, sampling_ratio=10**5),
    "deform_roi_pool": lambda: pydeform.deform_roi_pool(x, box, None, 2, sampling_ratio=10**5),
    "deform_psroi_pool": lambda: pydeform.deform_psroi_pool(x, box, group_size=2, pooled_size=2,
                                                            sample_per_part=10**5),
    "roi_align adaptive, huge box": lambda: pydeform.roi_align(x, huge, 2, spatial_scale=0.5, sampling_ratio=0,
                                                               aligned=True),
}
for name, call in calls.items():
    start = time.perf_counter()
    try:
        call()
        outcome = "returned"
    except ValueError as error:
        outcome = f"ValueError: {error}"
    print(json.dumps([name, outcome, time.perf_counter() - start]), flush=True)
"""
EXPECTED_OUTCOMES = {
    "roi_align": "ValueError: sampling_ratio: expected at most 1024 samples per bin and axis, got 100000",
    "ps_roi_align": "ValueError: sampling_ratio: expected at most 1024 samples per bin and axis, got 100000",
    "deform_roi_pool": "ValueError: sampling_ratio: expected at most 1024 samples per bin and axis, got 100000",
    "deform_psroi_pool": "ValueError: sample_per_part: expected at most 1024 samples per bin and axis, got 100000",
    "roi_align adaptive, huge box": "returned",
}
# Generous for a loaded 2-core machine (a compile included); each call itself must take seconds.
CHILD_TIMEOUT_S = 300
CALL_LIMIT_S = 10.0


def test_the_calls_that_hung_return_or_raise_within_seconds():
    try:
        done = subprocess.run([sys.executable, "-c", HANG_CASES], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        output, errors = done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        finished = (expired.stdout or b"").decode()
        pytest.fail(f"still running after {CHILD_TIMEOUT_S} s; finished before that:\n{finished}")
    assert done.returncode == 0, errors
    results = {name: (outcome, seconds) for name, outcome, seconds in map(json.loads, output.splitlines())}
    assert {name: outcome for name, (outcome, _) in results.items()} == EXPECTED_OUTCOMES
    slow = {name: seconds for name, (_, seconds) in results.items() if seconds > CALL_LIMIT_S}
    assert not slow, f"calls slower than {CALL_LIMIT_S} s: {slow}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ROI_OPS)
def test_reference_gives_absurd_boxes_zeros_and_no_gradient(op, dtype):
    check_invalid_rows(op, reference, ROWS, VALID_AT, {"spatial_scale": SCALE}, dtype)


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ROI_OPS)
def test_absurd_boxes_give_zeros_and_no_gradient(op, dtype, backend):
    with kernels_of(backend):
        check_invalid_rows(op, pydeform, ROWS, VALID_AT, {"spatial_scale": SCALE}, dtype)


SANITIZED_RUN = r"""
from unittest import mock
import numpy as np
import pydeform
import pydeform.roi as roi_module
from tests import host_shim
from tests.strategies import ROI_OPS
from tests.test_roi_bounded_work import ROWS, SCALE, VALID_AT
from tests.test_unchecked_values import check_invalid_rows

with mock.patch.object(roi_module, "roi_kernels", lambda library, kind: host_shim.SanitizedHostShimRoIKernels()):
    for op in ROI_OPS:
        for dtype in (np.float32, np.float64):
            check_invalid_rows(op, pydeform, ROWS, VALID_AT, {"spatial_scale": SCALE}, dtype)
print("all checked")
"""


@pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")
def test_absurd_boxes_run_clean_under_the_undefined_behaviour_sanitizer():
    """UBSan stops the process at the first out-of-range conversion (-fno-sanitize-recover), so
    the sanitized library runs in a child process."""
    done = subprocess.run([sys.executable, "-c", SANITIZED_RUN], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert "runtime error" not in done.stderr, done.stderr
    assert done.returncode == 0 and "all checked" in done.stdout, done.stderr


# One roi whose single bin is 1500 pixels wide and 1.5 high on rows that are all alike and vary
# along x: adaptive sampling takes 1024 x 2 samples, and another count along x would show.
CAPPED_ROW = np.sin(np.arange(6.0))
CAPPED_BOX = [0, -700.0, 0.2, 800.0, 1.7]
CAPPED_OPS = ["roi_align", "ps_roi_align", "deform_roi_pool"]


def capped_case(op, dtype):
    rows = np.array([CAPPED_BOX], dtype=np.float64 if dtype == np.float64 else np.float32)
    input = np.tile(CAPPED_ROW, (1, 1, 3, 1)).astype(dtype)
    return RoICase(op, input, rows, {"output_size": 1, "sampling_ratio": 0}, np.ones((1, 1, 1, 1), dtype))


def border_clamped_row_sample(row, x):
    """Rule B (docs/roi.md) along one row: 0 outside [-1, W], else the border-clamped lerp."""
    if x < -1 or x > len(row):
        return 0.0
    x = max(x, 0.0)
    x0 = int(np.floor(x))
    if x0 >= len(row) - 1:
        return row[-1]
    return row[x0] + (x - x0) * (row[x0 + 1] - row[x0])


@pytest.mark.parametrize("op", CAPPED_OPS)
def test_reference_caps_adaptive_sampling(op):
    """The bin's value is the mean over 1024 x positions at the centres of 1024 equal cells (the
    two rows of samples read the same values)."""
    shift = 0.0 if op == "roi_align" else 0.5  # roi_align is not aligned by default
    x1, x2 = CAPPED_BOX[1] - shift, CAPPED_BOX[3] - shift
    xs = x1 + (np.arange(MAX_SAMPLES_PER_AXIS) + 0.5) * (x2 - x1) / MAX_SAMPLES_PER_AXIS
    expected = np.mean([border_clamped_row_sample(CAPPED_ROW, x) for x in xs])
    got = capped_case(op, np.float64).forward(reference)
    np.testing.assert_allclose(got.ravel(), [expected], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", CAPPED_OPS)
def test_adaptive_sampling_is_capped_as_in_the_reference(op, dtype, backend):
    case = capped_case(op, dtype)
    with kernels_of(backend):
        got, grads = case.forward(pydeform), case.backward(pydeform)
    assert_close("output", got, case.forward(reference), dtype)
    assert_roi_grads_close(grads, case.backward(reference), dtype)


def test_pydeform_jax_checks_the_same_bounds():
    jnp = pytest.importorskip("jax.numpy")
    from pydeform import jax as pdj

    x = jnp.ones((1, 4, 8, 8))
    box = jnp.asarray([[0, 1.0, 1.0, 6.0, 6.0]])
    with pytest.raises(ValueError, match="sampling_ratio: expected at most 1024 samples per bin and axis"):
        pdj.roi_align(x, box, 2, sampling_ratio=10**5)
    with pytest.raises(ValueError, match="sample_per_part: expected at most 1024 samples per bin and axis"):
        pdj.deform_psroi_pool(x, box, group_size=2, pooled_size=2, sample_per_part=10**5)
