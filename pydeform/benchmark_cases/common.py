"""What every benchmark family builds on: the :class:`Case` and :class:`Calls` types, inputs in a
dtype on NumPy or CuPy, pydeform's calls and the dispatch to a case's peer, torchvision and ONNX
Runtime access, and the timing helpers. A family module (deform_conv.py, roi.py, ...) lists its
op names in ``OPS`` and yields its cases from ``standard_cases()``.

Importing this module needs NumPy only.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

#: Timed calls of each function per round of :func:`alternating_medians`.
BLOCK = 6
#: Distinct input sets (seeds) a GPU benchmark cycles through, so that repeated calls do not
#: find their inputs in L2.
INPUT_SETS = 3

GPU_DTYPES = ("float32", "bfloat16")
CPU_DTYPES = ("float32",)
TORCHVISION = "torchvision.ops.{}"
ONNXRUNTIME = "onnxruntime {} (CPU)"


class PeerUnavailable(RuntimeError):
    """The case has no peer, or its peer's library or device is missing here (the message says which)."""


class Case(NamedTuple):
    """One op at one standard shape on one device."""

    op: str  # the pydeform function, e.g. "roi_align"
    name: str  # tells the op's cases on one device apart, e.g. "7x7-sampling2"
    device: str  # "gpu" or "cpu"
    workload: str  # the shape in words, for tables and docs/benchmarks.md
    dtypes: tuple  # dtype names benchmarked: float32, and bfloat16 on the GPU where the op takes it
    build: Callable[[int], dict]  # seed -> host arrays, see host_inputs
    options: dict  # keyword arguments of the op (and of its backward) besides the arrays
    backward: bool  # the op has a ``<op>_backward``
    peer: Optional[str]  # what the peer is, e.g. "torchvision.ops.roi_align"; None: no peer
    # (host inputs, itemsize of the dtype) -> bytes the forward must move at least (its
    # bandwidth floor, see floor_bytes); None: no floor defined
    floor: Optional[Callable[[dict, int], int]] = None
    # keyword arguments of the backward only (``deterministic=True`` of the deterministic cases)
    backward_options: Optional[dict] = None
    # (case, host inputs, dtype) -> the peer's Calls (see peer_calls); None: no peer
    peer_builder: Optional[Callable[["Case", dict, str], "Calls"]] = None
    # keyword arguments of the forward only (``deterministic=True`` of a forward that scatters)
    forward_options: Optional[dict] = None
    # (case, device arrays, backend) -> kernel launches per iteration of an iterative op on the
    # CuPy backend (levelset.launches_per_iteration); None: not counted
    launches: Optional[Callable[["Case", dict, Optional[str]], int]] = None
    # (case, device arrays, backend) -> pydeform's Calls, where they are not the op and its
    # ``<op>_backward`` called on the arrays (see pydeform_calls); None: those
    pydeform_builder: Optional[Callable[["Case", dict, Optional[str]], "Calls"]] = None

    @property
    def id(self) -> str:
        return f"{self.op}/{self.device}/{self.name}"


class Calls(NamedTuple):
    """Zero-argument callables running one implementation of a case on fixed inputs."""

    forward: Callable[[], object]
    forward_backward: Optional[Callable[[], object]]  # None: no backward to time (e.g. ONNX Runtime)


# --- inputs ----------------------------------------------------------------------------------

#: Arrays kept in float32 whatever the benchmarked dtype: box coordinates of hundreds of pixels
#: are not representable in bfloat16, and pydeform takes them in the accumulation dtype.
_FLOAT32_ARRAYS = ("rois", "boxes")


def host_inputs(case: Case, seed: int = 0) -> dict:
    """The arrays of ``case`` as C-contiguous NumPy arrays: float32 data, int64 labels.

    Keys are the op's argument names, plus ``grad_output`` (the backward's first argument) when
    the op has a backward. The same seed gives the same arrays; none is all-zero.
    """
    return case.build(seed)


def dtype_of(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # registers bfloat16 with NumPy

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def device_inputs(host: dict, dtype: str, xp=np) -> dict:
    """``host`` (from :func:`host_inputs`) with its float arrays in ``dtype`` (rois and boxes stay
    float32, integer arrays unchanged) as ``xp`` arrays (``numpy`` or ``cupy``)."""
    converted = {}
    for name, array in host.items():
        if array.dtype.kind == "f" and name not in _FLOAT32_ARRAYS:
            array = array.astype(dtype_of(dtype))
        converted[name] = xp.asarray(array)
    return converted


def floor_bytes(case: Case, dtype: str, seed: int = 0) -> int:
    """Bytes the forward of ``case`` must move at least in ``dtype`` on the inputs of ``seed``:
    divided by the device bandwidth, the time no implementation can beat. Raises ValueError when
    the case defines no floor."""
    if case.floor is None:
        raise ValueError(f"{case.id} defines no bandwidth floor")
    return case.floor(host_inputs(case, seed), dtype_of(dtype).itemsize)


def normal(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def uniform(rng, low, high, shape):
    return rng.uniform(low, high, shape).astype(np.float32)


# --- pydeform and the peers ------------------------------------------------------------------


def pydeform_calls(case: Case, arrays: dict, backend: Optional[str] = None) -> Calls:
    """pydeform's op on ``arrays`` (from :func:`device_inputs`), with the case's options and
    ``backend=``; the forward + backward is None when the op has no backward. A case with a
    ``pydeform_builder`` builds its own."""
    if case.pydeform_builder is not None:
        return case.pydeform_builder(case, arrays, backend)
    import pydeform

    forward_op = getattr(pydeform, case.op)
    inputs = {name: array for name, array in arrays.items() if name != "grad_output"}

    def forward():
        return forward_op(**inputs, **case.options, **(case.forward_options or {}), backend=backend)

    if not case.backward:
        return Calls(forward, None)
    backward_op = getattr(pydeform, f"{case.op}_backward")

    def forward_backward():
        forward()
        return backward_op(arrays["grad_output"], **inputs, **case.options, **(case.backward_options or {}),
                           backend=backend)

    return Calls(forward, forward_backward)


def peer_calls(case: Case, host: dict, dtype: str) -> Calls:
    """The case's peer on ``host`` (from :func:`host_inputs`) in ``dtype``, built by the case's
    ``peer_builder``: on the GPU with torch tensors on CUDA, on the CPU with NumPy arrays (ONNX
    Runtime) or torch CPU tensors. Raises :class:`PeerUnavailable` when there is none or it
    cannot run here."""
    if case.peer is None:
        raise PeerUnavailable(f"{case.op} has no peer")
    return case.peer_builder(case, host, dtype)


def require_torch(cuda: bool):
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("torch is not installed") from None
    if cuda and not torch.cuda.is_available():
        raise PeerUnavailable("torch finds no CUDA GPU")
    return torch


def torch_dtype(torch, dtype):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def torchvision_calls(case, host, dtype):
    """torchvision.ops' op of the same name, its backward through autograd. In bfloat16 it runs
    under autocast: torchvision's kernels then compute in float32 (that is the path a bfloat16
    model takes)."""
    torch = require_torch(cuda=True)
    try:
        import torchvision.ops
    except ImportError:
        raise PeerUnavailable("torchvision is not installed") from None
    function = getattr(torchvision.ops, case.op)
    tensor_dtype = torch_dtype(torch, dtype)
    tensors = {
        # torchvision calls the rois "boxes" and keeps them in float32 like pydeform.
        "boxes" if name == "rois" else name:
            torch.from_numpy(array).to("cuda", torch.float32 if name == "rois" else tensor_dtype)
        for name, array in host.items()
    }
    grad_output = tensors.pop("grad_output")
    differentiable = [tensor.requires_grad_() for name, tensor in tensors.items() if name != "boxes"]
    autocast = dtype != "float32"

    def output():
        with torch.autocast("cuda", dtype=tensor_dtype, enabled=autocast):
            return function(**tensors, **case.options)

    return torch_autograd_calls(torch, output, differentiable, grad_output)


def torch_autograd_calls(torch, output, differentiable, grad_output) -> Calls:
    """The Calls of a torch peer: ``output()`` without autograd, and ``output()`` followed by its
    gradients with respect to the tensors ``differentiable`` (``grad_output`` in the output's dtype)."""

    def forward():
        with torch.no_grad():
            return output()

    def forward_backward():
        result = output()
        return torch.autograd.grad(result, differentiable, grad_output.to(result.dtype))

    return Calls(forward, forward_backward)


def onnx_models():
    """pydeform._onnx_models (the ONNX Runtime sessions of the CPU peers), or PeerUnavailable."""
    try:
        from .. import _onnx_models
    except ImportError as error:
        raise PeerUnavailable(f"onnx / onnxruntime not installed ({error})") from None
    return _onnx_models


# --- timing ----------------------------------------------------------------------------------


def alternating_medians(functions, rounds=5, block=BLOCK):
    """Median wall time in seconds of each function, timed in alternating blocks.

    Each round times ``block`` calls of every function in turn, after one untimed call: the
    blocks spread the machine's noise evenly over the functions compared, and the untimed call
    lets the previous function's worker threads (ONNX Runtime's and OpenMP's spin after their
    work) go idle first.
    """
    samples = [[] for _ in functions]
    for _ in range(rounds):
        for function, times in zip(functions, samples):
            function()
            for _ in range(block):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def cuda_median_ms(cupy, call, repeats=50, warmup=5):
    """Median milliseconds of ``call(index)`` timed with CUDA events on the legacy default
    stream, which CuPy and PyTorch both use by default; ``index`` counts the calls so that the
    caller can rotate its input sets. The warm-up calls absorb compilation and allocation."""
    for index in range(warmup):
        call(index)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for index in range(repeats):
        start.record()
        call(index)
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(samples)


def copy_bandwidth(cupy, mebibytes=512):
    """Measured device memory bandwidth in bytes per second: a device-to-device copy of
    ``mebibytes`` MiB reads and writes each byte once."""
    source = cupy.ones(mebibytes * 2**20, dtype=cupy.uint8)
    target = cupy.empty_like(source)
    milliseconds = cuda_median_ms(cupy, lambda index: cupy.copyto(target, source), repeats=20)
    return 2 * source.nbytes / (milliseconds * 1e-3)


def cupy_peak_extra_mib(cupy, call):
    """Device memory in MiB that ``call()`` needs beyond its inputs, as growth of CuPy's memory
    pool over one call started from an empty cache (the pool keeps freed blocks, so its size
    afterwards is the peak of the call). ``call`` runs twice: once to compile and warm up."""
    pool = cupy.get_default_memory_pool()
    call()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    call()
    cupy.cuda.Device().synchronize()
    return (pool.total_bytes() - before) / 2**20


def torch_peak_extra_mib(torch, call):
    """Peak device memory in MiB that ``call()`` allocates through torch beyond what was
    allocated before it (``torch.cuda.max_memory_allocated`` delta); ``call`` runs twice."""
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
