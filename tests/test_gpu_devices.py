"""Every public op on the second GPU of a machine with two or more: arrays made under
``cupy.cuda.Device(1)`` and passed while GPU 0 is current, with both GPU kernel sets. The
results live on GPU 1 and equal those of the same call on GPU 0.

``gpu``-marked, and skipped on a machine with a single GPU; the CPU-side twin is
tests/test_devices.py, which records the device of every allocation and launch."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_devices import CASES, _arrays_in, _on_gpu

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA GPUs")
    return cupy


def _run_on(cupy, device_id, op, backend):
    case, run = CASES[op]
    with cupy.cuda.Device(device_id):
        case = _on_gpu(case, cupy.asarray)
    assert cupy.cuda.Device().id == 0
    result = run(case, backend)
    cupy.cuda.Device(device_id).synchronize()
    return list(_arrays_in(result))


@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_an_op_on_the_second_gpu(cupy, op, backend):
    on_second = _run_on(cupy, 1, op, backend)
    on_first = _run_on(cupy, 0, op, backend)
    for got, expected in zip(on_second, on_first):
        assert got.device.id == 1
        expected = cupy.asnumpy(expected)
        tolerance = 1e-10 if expected.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=tolerance, atol=tolerance)
