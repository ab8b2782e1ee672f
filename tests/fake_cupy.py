"""Stand-ins for CuPy and Numba's CUDA module on a machine without a GPU, that keep track of
devices: which device each array lives on, which one is current when an array is allocated and
when a kernel is launched.

As with CuPy, a new array lives on the device current when it is allocated (a view on its base
array's device), ``cupy.cuda.Device(i)`` makes device ``i`` current within a ``with`` block and
each device has its own current stream (``STREAM_BASE + i`` unless a ``with
cupy.cuda.ExternalStream(ptr, i)`` block makes another one current). Numba's CUDA module has a current device of its own,
changed by ``with cuda.gpus[i]``. Arrays are NumPy arrays inside; kernels do not run.
The ``fake_gpu`` fixture puts both in place for the public ops, recording every allocation and
launch in ``FakeCupy.events``.
"""

from __future__ import annotations

import contextlib

import operator
import sys
import types

import numpy as np
import pytest

# The stream CuPy makes current on device i (a distinct number per device).
STREAM_BASE = 0x1000


class FakeCupy(types.ModuleType):
    def __init__(self):
        super().__init__("cupy")
        self.current = 0
        self.events = []
        fake = self

        class Device:
            def __init__(self, device_id=None):
                self.id = fake.current if device_id is None else device_id
                self._previous = []

            def __enter__(self):
                self._previous.append(fake.current)
                fake.current = self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._previous.pop()

            def synchronize(self):
                pass

        # Streams made current on each device with ``with cupy.cuda.ExternalStream(...)``.
        streams = {}

        class ExternalStream:
            def __init__(self, ptr, device_id):
                self.ptr, self.device_id = ptr, device_id

            def __enter__(self):
                assert self.device_id == fake.current, "a stream of another device made current"
                streams.setdefault(fake.current, []).append(self.ptr)

            def __exit__(self, *exc):
                streams[self.device_id].pop()

        def get_current_stream():
            ptr = (streams.get(fake.current) or [STREAM_BASE + fake.current])[-1]
            return types.SimpleNamespace(ptr=ptr, device_id=fake.current)

        class ndarray(_FakeArrayBase):
            __module__ = "cupy"
            owner = fake

        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream,
                                          get_current_stream=get_current_stream)
        self.ndarray = ndarray

    # Arrays ----------------------------------------------------------------------------------

    def wrap(self, result, sources):
        """NumPy ``result`` of an operation on the fake arrays ``sources``: a view keeps its
        base's device, anything else is an allocation on the current device."""
        if isinstance(result, (tuple, list)):
            return type(result)(self.wrap(item, sources) for item in result)
        if not isinstance(result, np.ndarray):
            return result
        for source in sources:
            if np.may_share_memory(result, source.array):
                return self.ndarray(result, source.device.id)
        self.events.append(("allocate", self.current))
        return self.ndarray(result, self.current)

    def asarray(self, value, dtype=None):
        if isinstance(value, self.ndarray):
            return value if dtype is None else value.astype(dtype, copy=False)
        interface = getattr(value, "__cuda_array_interface__", None)
        if interface is not None:
            # Real CuPy builds the dtype from the interface's typestr, which for bfloat16
            # (from XLA, as from ml_dtypes) is "<V2": a void type, not bfloat16.
            return self.ndarray(value.array.view(np.dtype(interface["typestr"])), value.device)
        return self.wrap(np.array(value, dtype=dtype), ())

    def asnumpy(self, value):
        return value.array.copy()

    def __getattr__(self, name):
        function = getattr(np, "zeros" if name == "empty" else name)

        def call(*args, **kwargs):
            sources = [a for a in _flatten((args, kwargs)) if isinstance(a, _FakeArrayBase)]
            return self.wrap(function(*_unwrap(args), **_unwrap(kwargs)), sources)

        return call

    # Launches --------------------------------------------------------------------------------

    def raw_kernel(self, template, device_id):
        """A CuPy RawKernel of ``template`` compiled for ``device_id``: records its launches."""

        def kernel(grid, block, args):
            stream = self.cuda.get_current_stream().ptr
            self.events.append(("launch", template, device_id, self.current, stream, _devices(args)))

        return kernel


class _FakeArrayBase:
    """A CuPy-like array: a NumPy array and the device it lives on."""

    __module__ = "cupy"
    owner: FakeCupy

    def __init__(self, array, device_id):
        self.array = array
        self.device = types.SimpleNamespace(id=device_id)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.array.shape, "typestr": self.array.dtype.str, "version": 3,
                "data": (self.array.ctypes.data, False),
                "strides": None if self.array.flags.c_contiguous else self.array.strides}

    def __getattr__(self, name):
        value = getattr(self.array, name)
        if not callable(value):
            return self.owner.wrap(value, [self])

        def call(*args, **kwargs):
            sources = [self, *(a for a in _flatten((args, kwargs)) if isinstance(a, _FakeArrayBase))]
            return self.owner.wrap(value(*_unwrap(args), **_unwrap(kwargs)), sources)

        return call

    def __getitem__(self, key):
        return self.owner.wrap(self.array[_unwrap(key)], [self])

    def __setitem__(self, key, value):
        self.array[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self.array)

    def __bool__(self):
        return bool(self.array)

    def __int__(self):
        return int(self.array)

    def __float__(self):
        return float(self.array)

    def __repr__(self):
        return f"FakeArray(device={self.device.id}, {self.array!r})"


def _operator(function, reflected=False):
    def apply(self, *other):
        operands = (_unwrap(other[0]), self.array) if reflected else (self.array, *_unwrap(other))
        sources = [self, *(o for o in other if isinstance(o, _FakeArrayBase))]
        return self.owner.wrap(function(*operands), sources)

    return apply


for _name in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "add", "sub", "mul", "truediv", "floordiv",
              "mod", "pow"):
    setattr(_FakeArrayBase, f"__{_name}__", _operator(getattr(operator, _name + "_" if _name in ("and", "or") else _name)))
for _name in ("add", "sub", "mul", "truediv", "and", "or"):
    setattr(_FakeArrayBase, f"__r{_name}__",
            _operator(getattr(operator, _name + "_" if _name in ("and", "or") else _name), reflected=True))
for _name in ("neg", "invert", "abs"):
    setattr(_FakeArrayBase, f"__{_name}__", _operator(getattr(operator, _name)))
_FakeArrayBase.__hash__ = None


def _flatten(value):
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def _unwrap(value):
    if isinstance(value, _FakeArrayBase):
        return value.array
    if isinstance(value, tuple):
        return tuple(_unwrap(item) for item in value)
    if isinstance(value, list):
        return [_unwrap(item) for item in value]
    if isinstance(value, dict):
        return {key: _unwrap(item) for key, item in value.items()}
    return value


def _devices(args):
    return tuple(a.device.id for a in args if isinstance(a, _FakeArrayBase))


class FakeNumbaCuda:
    """Numba's CUDA module as the Numba CUDA launches use it: ``gpus[i]`` makes device ``i``
    Numba's current one, ``external_stream(ptr)`` wraps a stream in Numba's current context."""

    def __init__(self, cupy: FakeCupy):
        self.cupy = cupy
        self.current = 0
        fake = self

        class Gpu:
            def __init__(self, device_id):
                self.id = device_id
                self._previous = []

            def __enter__(self):
                self._previous.append(fake.current)
                fake.current = self.id

            def __exit__(self, *exc):
                fake.current = self._previous.pop()

        self.gpus = [Gpu(i) for i in range(4)]

    def external_stream(self, ptr):
        return types.SimpleNamespace(ptr=ptr, context_device=self.current)

    def kernels(self, count=8):
        """Stand-ins for a family's compiled Numba CUDA kernels (indexed or sliced like them)."""
        return tuple(_FakeNumbaKernel(self, i) for i in range(count))


class _FakeNumbaKernel:
    def __init__(self, numba_cuda, index):
        self.numba_cuda, self.index = numba_cuda, index

    def __getitem__(self, configuration):
        blocks, threads, stream = configuration
        numba_cuda = self.numba_cuda

        def launch(*args):
            numba_cuda.cupy.events.append(
                ("numba launch", self.index, numba_cuda.current, stream.context_device, stream.ptr,
                 numba_cuda.cupy.current, _devices(args)))

        return launch


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeCupy:
    """A FakeCupy in place of ``cupy`` and a FakeNumbaCuda in place of Numba's CUDA module for
    the Numba CUDA launches; kernel sets are made afresh before and after the test (they hold
    their array library)."""
    from pydeform.backends import kernel_set
    from pydeform.backends.cupy_kernels import _compile
    from pydeform.backends.numba_kernels import centernet, deform_conv, deform_pool, levelset, roi, semiconv, targets

    fake = FakeCupy()
    numba_cuda = FakeNumbaCuda(fake)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_compile, "_kernel", lambda manifest, template, type_name, device_id:
                        fake.raw_kernel(template, device_id))
    monkeypatch.setattr(targets, "bind_cuda", lambda: numba_cuda)
    monkeypatch.setattr(deform_conv, "_cuda_kernels", lambda dtype: numba_cuda.kernels())
    monkeypatch.setattr(roi, "cuda_kernels", lambda family, dtype: numba_cuda.kernels())
    monkeypatch.setattr(centernet, "cuda_kernels", lambda dtype: numba_cuda.kernels())
    monkeypatch.setattr(deform_pool, "_cuda_kernels", lambda dtype: numba_cuda.kernels())
    monkeypatch.setattr(semiconv, "cuda_kernels", lambda: numba_cuda.kernels(9))
    monkeypatch.setattr(levelset, "cuda_kernels", lambda: numba_cuda.kernels(len(levelset.CUDA_KERNELS)))
    # The stand-in kernels are not Numba dispatchers: nothing to watch for a first compile.
    monkeypatch.setattr(targets, "watching_numba_cuda_launch", lambda kernel: contextlib.nullcontext())
    kernel_set.cache_clear()
    yield fake
    kernel_set.cache_clear()
