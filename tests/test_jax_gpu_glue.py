"""CPU-side twin of the JAX GPU path: what the buffer_callback body does with CUDA buffers
(CuPy views, XLA's stream and the buffer's device made current), checked with stand-ins for
XLA's buffers and for CuPy; tests/test_gpu_jax.py runs the real thing."""

import sys
import types

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("jax")
import pydeform.jax as pdj  # noqa: E402
from pydeform._workspace import output  # noqa: E402


class FakeCudaBuffer:
    """An XLA buffer on CUDA device ``device``, backed by a NumPy array: like
    ``jax.experimental.buffer_callback.Buffer``, it has the array's ``dtype`` and ``shape`` and
    a CUDA array interface whose typestr is the dtype's (``"<V2"`` for bfloat16)."""

    def __init__(self, array, device):
        self.array, self.device = array, device
        self.dtype, self.shape = array.dtype, array.shape

    def __dlpack_device__(self):
        return (2, self.device)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.array.ctypes.data, False),
                "version": 3}


class FakeCupy(types.ModuleType):
    def __init__(self):
        super().__init__("cupy")
        self.events = []
        fake = self

        class Device:
            def __init__(self, device_id):
                self.device_id = device_id

            def __enter__(self):
                fake.events.append(("device", self.device_id))

            def __exit__(self, *exc):
                fake.events.append(("device exit", self.device_id))

        class ExternalStream:
            def __init__(self, ptr, device_id):
                self.ptr, self.device_id = ptr, device_id

            def __enter__(self):
                fake.events.append(("stream", self.ptr, self.device_id))

            def __exit__(self, *exc):
                fake.events.append(("stream exit", self.ptr))

        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)

    def asarray(self, buffer):
        """As CuPy's: an array of the dtype the CUDA array interface's typestr names."""
        self.events.append(("asarray", buffer.device))
        return buffer.array.view(np.dtype(buffer.__cuda_array_interface__["typestr"]))


def test_cuda_buffers_become_cupy_views_on_xlas_stream_and_device(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    seen = {}

    def run(arrays, backend):
        seen["arrays"], seen["backend"] = arrays, backend
        seen["events at run"] = list(fake.events)
        out = output(np, "output", arrays["x"].shape, arrays["x"].dtype)
        np.multiply(arrays["x"], 2, out=out)
        return {"output": out}

    callback = pdj._callback(run, ("x",), "cupy")
    x = FakeCudaBuffer(np.arange(4.0), device=1)
    out = FakeCudaBuffer(np.zeros(4), device=1)
    ctx = types.SimpleNamespace(stream=0xABC)
    callback(ctx, {"output": out}, x)
    assert seen["backend"] == "cupy"
    assert seen["events at run"][:2] == [("device", 1), ("stream", 0xABC, 1)]
    assert ("asarray", 1) in seen["events at run"]
    assert fake.events[-2:] == [("stream exit", 0xABC), ("device exit", 1)]
    # The driver wrote its result into XLA's output buffer.
    np.testing.assert_array_equal(out.array, [0.0, 2.0, 4.0, 6.0])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_cuda_buffers_keep_their_dtype(monkeypatch, dtype):
    """XLA describes a bfloat16 buffer with typestr "<V2", from which CuPy makes a void array."""
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    seen = {}

    def run(arrays, backend):
        seen["x"] = arrays["x"].dtype
        out = output(np, "output", arrays["x"].shape, arrays["x"].dtype)
        out[...] = arrays["x"]
        seen["output"] = out.dtype
        return {"output": out}

    x = FakeCudaBuffer(np.arange(4.0).astype(dtype), device=0)
    out = FakeCudaBuffer(np.zeros(4, dtype), device=0)
    pdj._callback(run, ("x",), None)(types.SimpleNamespace(stream=1), {"output": out}, x)
    assert seen == {"x": np.dtype(dtype), "output": np.dtype(dtype)}
    np.testing.assert_array_equal(out.array, x.array)


def test_a_result_outside_xlas_buffer_is_an_error(monkeypatch):
    """No silent copy: a driver that returns an array of its own (not the provided output) fails."""
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    x, out = FakeCudaBuffer(np.arange(4.0), device=0), FakeCudaBuffer(np.zeros(4), device=0)
    callback = pdj._callback(lambda arrays, backend: {"output": arrays["x"] * 2}, ("x",), "cupy")
    with pytest.raises(RuntimeError, match="result 'output' was not written into XLA's output buffer"):
        callback(types.SimpleNamespace(stream=1), {"output": out}, x)


def test_cpu_buffers_skip_the_stream_and_inputs_are_read_only():
    class CpuBuffer:
        def __init__(self, array):
            self.array = array

        def __dlpack_device__(self):
            return (1, 0)

        def __array__(self, dtype=None, copy=None):
            return self.array

    def run(arrays, backend):
        with pytest.raises(ValueError, match="read-only"):
            arrays["x"][0] = 1.0
        return {"output": np.add(arrays["x"], 1, out=output(np, "output", (3,), np.float64))}

    x, out = CpuBuffer(np.zeros(3)), CpuBuffer(np.zeros(3))
    pdj._callback(run, ("x",), None)(types.SimpleNamespace(), {"output": out}, x)
    np.testing.assert_array_equal(out.array, 1.0)
    np.testing.assert_array_equal(x.array, 0.0)
