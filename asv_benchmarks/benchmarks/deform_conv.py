"""deform_conv2d benchmarks on the standard shapes of PERF.md.

CPU: N=2, C=64 -> 64, 64x64, 3x3, pad 1, float32, with mask, against ONNX Runtime's DeformConv.
GPU: the DCNv2 layers N=16, C=256 -> 256, 64x64 and N=8, C=64 -> 64, 128x128 (3x3, pad 1), in
float32 and bfloat16, pydeform's two CUDA backends against torchvision; skipped without a GPU.
"""

import numpy as np

from .timing import (
    INPUT_SETS, CpuComparison, cuda_median_ms, require_cupy_gpu, require_onnx_models, require_torchvision,
)

CPU_SHAPE = (2, 64, 64, 64)  # N, C (in = out), H, W
CPU_WORKLOAD = "N=2, C=64 -> 64, 64x64, 3x3, pad 1, float32, with mask"
DCN_SHAPES = {"N16-C256-64x64": (16, 256, 64, 64), "N8-C64-128x128": (8, 64, 128, 128)}
KERNEL = 3
PADDING = 1


def layer_arguments(shape, seed=0):
    """Random float32 arguments of a 3x3, pad 1 DCNv2 layer with C -> C channels: offsets up to
    2 pixels, mask in (0, 1), weights scaled like a trained layer's."""
    n, channels, height, width = shape
    rng = np.random.default_rng(seed)
    points = KERNEL * KERNEL
    arrays = {
        "input": rng.standard_normal((n, channels, height, width)),
        "offset": rng.uniform(-2.0, 2.0, (n, 2 * points, height, width)),
        "weight": rng.standard_normal((channels, channels, KERNEL, KERNEL)) / np.sqrt(channels * points),
        "bias": rng.standard_normal(channels),
        "mask": rng.uniform(0.0, 1.0, (n, points, height, width)),
    }
    return {name: array.astype(np.float32) for name, array in arrays.items()}


def output_gradient(shape, seed=0):
    return np.random.default_rng(seed + 1000).standard_normal(shape).astype(np.float32)


def onnxruntime_forward(arrays):
    """A call running ORT's CPU ``DeformConv`` on ``arrays`` (the model of the tests' builder)."""
    run = require_onnx_models().deform_conv_session(
        arrays["weight"].shape, 1, PADDING, 1, 1, 1, has_bias=True, has_mask=True, dtype=np.float32
    )
    return lambda: run(arrays["input"], arrays["weight"], arrays["offset"], arrays["bias"], arrays["mask"])


def pydeform_forward(arrays, backend=None):
    from pydeform import deform_conv2d

    return lambda: deform_conv2d(**arrays, padding=PADDING, backend=backend)


def pydeform_forward_backward(arrays, grad_output, backend=None):
    from pydeform import deform_conv2d, deform_conv2d_backward

    def run():
        deform_conv2d(**arrays, padding=PADDING, backend=backend)
        return deform_conv2d_backward(grad_output, **arrays, padding=PADDING, backend=backend)

    return run


def cpu_comparisons():
    """The CPU forward on the CPU shape, pydeform (Numba CPU) against ORT's DeformConv."""
    arrays = layer_arguments(CPU_SHAPE)
    return [CpuComparison("deform_conv2d forward", pydeform_forward(arrays), onnxruntime_forward(arrays),
                          "onnxruntime DeformConv")]


class DeformConv2dCpu:
    """pydeform's Numba CPU backend on the CPU shape."""

    timeout = 300

    def setup(self):
        arrays = layer_arguments(CPU_SHAPE)
        self.forward = pydeform_forward(arrays)
        self.forward_backward = pydeform_forward_backward(arrays, output_gradient(CPU_SHAPE))
        self.forward_backward()  # JIT compilation, outside the timings

    def time_forward(self):
        self.forward()

    def time_forward_backward(self):
        self.forward_backward()


class OnnxRuntimeDeformConvCpu:
    """The CPU peer: ONNX Runtime's DeformConv forward on the same shape and data."""

    timeout = 300

    def setup(self):
        self.forward = onnxruntime_forward(layer_arguments(CPU_SHAPE))

    def time_forward(self):
        self.forward()

    def track_pydeform_forward_speedup(self):
        """ORT time / pydeform time, both measured in this process (>= 1: pydeform is faster)."""
        return cpu_comparisons()[0].speedup()

    track_pydeform_forward_speedup.unit = "ratio"


class _PydeformGpuRunner:
    def __init__(self, cupy, host_sets, grad_output, dtype, backend):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

        device_dtype = np.dtype(dtype)
        self.cupy = cupy
        self.sets = [{k: cupy.asarray(v.astype(device_dtype)) for k, v in arrays.items()} for arrays in host_sets]
        self.grad_output = cupy.asarray(grad_output.astype(device_dtype))
        self.backend = backend

    def forward(self, index):
        pydeform_forward(self.sets[index % INPUT_SETS], self.backend)()

    def forward_backward(self, index):
        pydeform_forward_backward(self.sets[index % INPUT_SETS], self.grad_output, self.backend)()

    def peak_extra_mib(self):
        """Growth of CuPy's memory pool over one forward + backward started from an empty cache:
        the pool keeps freed blocks, so its size afterwards is the peak the call needed."""
        pool = self.cupy.get_default_memory_pool()
        self.forward_backward(0)
        self.cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        self.forward_backward(0)
        self.cupy.cuda.Device().synchronize()
        return (pool.total_bytes() - before) / 2**20


class _TorchvisionRunner:
    """torchvision.ops.deform_conv2d; bfloat16 runs under autocast, which computes in float32."""

    def __init__(self, host_sets, grad_output, dtype):
        self.torch, self.ops = require_torchvision()
        torch = self.torch
        self.autocast = dtype == "bfloat16"
        tensor_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.sets = [
            {k: torch.from_numpy(v).to("cuda", tensor_dtype).requires_grad_() for k, v in arrays.items()}
            for arrays in host_sets
        ]
        self.grad_output = torch.from_numpy(grad_output).to("cuda", tensor_dtype)

    def _output(self, arrays):
        with self.torch.autocast("cuda", dtype=self.torch.bfloat16, enabled=self.autocast):
            return self.ops.deform_conv2d(
                arrays["input"], arrays["offset"], arrays["weight"], arrays["bias"],
                padding=PADDING, mask=arrays["mask"],
            )

    def forward(self, index):
        with self.torch.no_grad():
            self._output(self.sets[index % INPUT_SETS])

    def forward_backward(self, index):
        arrays = self.sets[index % INPUT_SETS]
        output = self._output(arrays)
        self.torch.autograd.grad(output, list(arrays.values()), self.grad_output.to(output.dtype))

    def peak_extra_mib(self):
        torch = self.torch
        self.forward_backward(0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.forward_backward(0)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


class DeformConv2dGpu:
    """DCNv2 layers on the GPU: CUDA-event medians after warm-up, rotating input sets."""

    params = (list(DCN_SHAPES), ["float32", "bfloat16"], ["pydeform-cupy", "pydeform-numba", "torchvision"])
    param_names = ("shape", "dtype", "implementation")
    timeout = 600

    def setup(self, shape, dtype, implementation):
        self.cupy = require_cupy_gpu()
        host_sets = [layer_arguments(DCN_SHAPES[shape], seed) for seed in range(INPUT_SETS)]
        n, channels, height, width = DCN_SHAPES[shape]
        grad_output = output_gradient((n, channels, height, width))
        if implementation == "torchvision":
            self.runner = _TorchvisionRunner(host_sets, grad_output, dtype)
        else:
            backend = implementation.removeprefix("pydeform-")
            self.runner = _PydeformGpuRunner(self.cupy, host_sets, grad_output, dtype, backend)

    def track_forward_ms(self, shape, dtype, implementation):
        return cuda_median_ms(self.cupy, self.runner.forward)

    def track_forward_backward_ms(self, shape, dtype, implementation):
        return cuda_median_ms(self.cupy, self.runner.forward_backward, repeats=20)

    def track_peak_extra_memory_mib(self, shape, dtype, implementation):
        return self.runner.peak_extra_mib()

    track_forward_ms.unit = "ms"
    track_forward_backward_ms.unit = "ms"
    track_peak_extra_memory_mib.unit = "MiB"
