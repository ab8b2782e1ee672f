"""RoI benchmarks on the standard shapes of PERF.md, float32.

CPU: 256 rois on a C=64, 100x152 feature map (stride 4 of a 400x608 image), 7x7 output:
roi_align (aligned, sampling_ratio 2 and adaptive) against ONNX Runtime's RoiAlign (half_pixel;
its adaptive sampling is sampling_ratio 0), and roi_pool against ORT's MaxRoiPool; forward and
pydeform's forward + backward.
GPU: N=2, C=256, 200x304 map (stride 4 of 800x1216), 512 rois, 7x7 and 14x14 output:
roi_align (aligned) and ps_roi_align with sampling_ratio 2 and adaptive, roi_pool and
ps_roi_pool, pydeform's two CUDA backends against torchvision; skipped without a GPU. The
position-sensitive ops read C_out*PH*PW channels, C_out = 256 // (PH*PW) (245 channels at 7x7,
196 at 14x14).
Rois are 16..400 image pixels wide and high (log-uniform, independently), inside the image.
"""

import numpy as np

from .timing import (
    INPUT_SETS, CpuComparison, cuda_median_ms, require_cupy_gpu, require_onnx_models, require_torchvision,
)

STRIDE = 4
SPATIAL_SCALE = 1 / STRIDE
CPU_MAP = (1, 64, 100, 152)  # N, C, H, W
CPU_ROIS = 256
CPU_OUTPUT_SIZE = 7
CPU_WORKLOAD = "256 rois on N=1, C=64, 100x152 (spatial_scale 1/4), rois 16..400 px, 7x7, float32"
GPU_MAP = (2, 256, 200, 304)
GPU_ROIS = 512
ROI_SIDES = (16.0, 400.0)  # image pixels
# sampling_ratio of pydeform and torchvision (<= 0: adaptive); ORT's adaptive value is 0.
SAMPLING = {"2": 2, "adaptive": -1}
OUTPUT_SIZES = {"7x7": 7, "14x14": 14}
GPU_IMPLEMENTATIONS = ["pydeform-cupy", "pydeform-numba", "torchvision"]


def feature_map(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def random_rois(count, map_shape, seed=0):
    """float32 [count, 5] rows (batch_index, x1, y1, x2, y2) in the image pixels of a stride-4
    map of ``map_shape`` (N, C, H, W): sides log-uniform in ROI_SIDES, boxes inside the image."""
    batch, _, height, width = map_shape
    rng = np.random.default_rng(seed + 1000)
    image = np.array([width, height]) * STRIDE
    sides = np.exp(rng.uniform(*np.log(ROI_SIDES), (count, 2)))
    starts = rng.uniform(0.0, 1.0, (count, 2)) * (image - sides)
    return np.column_stack([rng.integers(0, batch, count), starts, starts + sides]).astype(np.float32)


def output_gradient(shape, seed=0):
    return np.random.default_rng(seed + 2000).standard_normal(shape, dtype=np.float32)


def pydeform_call(op, input, rois, options, grad_output=None):
    """A call of pydeform's ``op`` with keyword ``options``: the forward, or with ``grad_output``
    the forward and then ``<op>_backward``."""
    import pydeform

    forward = getattr(pydeform, op)
    if grad_output is None:
        return lambda: forward(input, rois, **options)
    backward = getattr(pydeform, f"{op}_backward")

    def run():
        forward(input, rois, **options)
        return backward(grad_output, input, rois, **options)

    return run


# --- CPU ----------------------------------------------------------------------------------


def align_options(sampling):
    return dict(output_size=CPU_OUTPUT_SIZE, spatial_scale=SPATIAL_SCALE, sampling_ratio=SAMPLING[sampling],
                aligned=True)


POOL_OPTIONS = dict(output_size=CPU_OUTPUT_SIZE, spatial_scale=SPATIAL_SCALE)


def cpu_arguments():
    """(feature map, rois, output gradient) of the CPU shape."""
    return (feature_map(CPU_MAP), random_rois(CPU_ROIS, CPU_MAP),
            output_gradient((CPU_ROIS, CPU_MAP[1], CPU_OUTPUT_SIZE, CPU_OUTPUT_SIZE)))


def roi_align_comparison(sampling):
    """roi_align forward on the CPU shape, pydeform against ORT's RoiAlign (half_pixel = aligned)."""
    input, rois, _ = cpu_arguments()
    session = require_onnx_models().roi_align_session(
        CPU_OUTPUT_SIZE, SPATIAL_SCALE, max(SAMPLING[sampling], 0), True, "avg", np.float32
    )
    label = "roi_align forward, " + ("adaptive sampling" if SAMPLING[sampling] <= 0 else f"sampling_ratio {sampling}")
    return CpuComparison(label, pydeform_call("roi_align", input, rois, align_options(sampling)),
                         lambda: session(input, rois), "onnxruntime RoiAlign")


def roi_pool_comparison():
    """roi_pool forward on the CPU shape, pydeform against ORT's MaxRoiPool."""
    input, rois, _ = cpu_arguments()
    session = require_onnx_models().max_roi_pool_session(CPU_OUTPUT_SIZE, SPATIAL_SCALE)
    return CpuComparison("roi_pool forward", pydeform_call("roi_pool", input, rois, POOL_OPTIONS),
                         lambda: session(input, rois), "onnxruntime MaxRoiPool")


def roi_align_comparisons():
    return [roi_align_comparison(sampling) for sampling in SAMPLING]


def roi_pool_comparisons():
    return [roi_pool_comparison()]


class _PydeformCpu:
    """pydeform's Numba CPU backend on the CPU shape: ``op`` with the options of ``options()``."""

    timeout = 300
    op = None

    def setup(self, *params):
        input, rois, grad_output = cpu_arguments()
        options = self.options(*params)
        self.forward = pydeform_call(self.op, input, rois, options)
        self.forward_backward = pydeform_call(self.op, input, rois, options, grad_output)
        self.forward_backward()  # JIT compilation, outside the timings

    def time_forward(self, *params):
        self.forward()

    def time_forward_backward(self, *params):
        self.forward_backward()


class _OnnxRuntimeCpu:
    """The CPU peer on the same shape and data, and pydeform's speed ratio against it."""

    timeout = 300

    def setup(self, *params):
        self.comparison = self.comparison_of(*params)

    def time_forward(self, *params):
        self.comparison.peer()

    def track_pydeform_forward_speedup(self, *params):
        """Peer time / pydeform time, both measured in this process (>= 1: pydeform is faster)."""
        return self.comparison.speedup()

    track_pydeform_forward_speedup.unit = "ratio"


class RoIAlignCpu(_PydeformCpu):
    params = (list(SAMPLING),)
    param_names = ("sampling",)
    op = "roi_align"
    options = staticmethod(align_options)


class OnnxRuntimeRoIAlignCpu(_OnnxRuntimeCpu):
    params = (list(SAMPLING),)
    param_names = ("sampling",)
    comparison_of = staticmethod(roi_align_comparison)


class RoIPoolCpu(_PydeformCpu):
    op = "roi_pool"

    @staticmethod
    def options():
        return POOL_OPTIONS


class OnnxRuntimeMaxRoiPoolCpu(_OnnxRuntimeCpu):
    comparison_of = staticmethod(roi_pool_comparison)


# --- GPU ----------------------------------------------------------------------------------


def gpu_options(op, output_size, sampling=None):
    options = dict(output_size=OUTPUT_SIZES[output_size], spatial_scale=SPATIAL_SCALE)
    if sampling is not None:
        options["sampling_ratio"] = SAMPLING[sampling]
    if op == "roi_align":
        options["aligned"] = True
    return options


def gpu_map_shape(op, output_size):
    n, channels, height, width = GPU_MAP
    if op.startswith("ps_"):
        cells = OUTPUT_SIZES[output_size] ** 2
        channels = max(1, channels // cells) * cells
    return n, channels, height, width


def gpu_output_shape(op, map_shape, options):
    size = options["output_size"]
    channels = map_shape[1] // size**2 if op.startswith("ps_") else map_shape[1]
    return GPU_ROIS, channels, size, size


class _PydeformGpuRunner:
    def __init__(self, cupy, op, host_sets, rois, grad_output, options):
        device_rois, device_grad = cupy.asarray(rois), cupy.asarray(grad_output)
        inputs = [cupy.asarray(input) for input in host_sets]
        self.forwards = [pydeform_call(op, input, device_rois, options) for input in inputs]
        self.forward_backwards = [pydeform_call(op, input, device_rois, options, device_grad) for input in inputs]

    def forward(self, index):
        self.forwards[index % INPUT_SETS]()

    def forward_backward(self, index):
        self.forward_backwards[index % INPUT_SETS]()


class _TorchvisionRunner:
    """torchvision.ops' op of the same name; the backward through autograd."""

    def __init__(self, op, host_sets, rois, grad_output, options):
        self.torch, ops = require_torchvision()
        torch = self.torch
        self.function = getattr(ops, op)
        self.inputs = [torch.from_numpy(input).cuda().requires_grad_() for input in host_sets]
        self.rois = torch.from_numpy(rois).cuda()
        self.grad_output = torch.from_numpy(grad_output).cuda()
        self.options = options

    def forward(self, index):
        with self.torch.no_grad():
            self.function(self.inputs[index % INPUT_SETS], self.rois, **self.options)

    def forward_backward(self, index):
        input = self.inputs[index % INPUT_SETS]
        output = self.function(input, self.rois, **self.options)
        self.torch.autograd.grad(output, input, self.grad_output)


class _RoIGpu:
    """GPU timings: CUDA-event medians after warm-up, rotating input sets."""

    timeout = 600

    def setup_runner(self, op, output_size, sampling, implementation):
        self.cupy = require_cupy_gpu()
        options = gpu_options(op, output_size, sampling)
        map_shape = gpu_map_shape(op, output_size)
        host_sets = [feature_map(map_shape, seed) for seed in range(INPUT_SETS)]
        rois = random_rois(GPU_ROIS, map_shape)
        grad_output = output_gradient(gpu_output_shape(op, map_shape, options))
        if implementation == "torchvision":
            self.runner = _TorchvisionRunner(op, host_sets, rois, grad_output, options)
        else:
            options["backend"] = implementation.removeprefix("pydeform-")
            self.runner = _PydeformGpuRunner(self.cupy, op, host_sets, rois, grad_output, options)

    def track_forward_ms(self, *params):
        return cuda_median_ms(self.cupy, self.runner.forward)

    def track_forward_backward_ms(self, *params):
        return cuda_median_ms(self.cupy, self.runner.forward_backward, repeats=20)

    track_forward_ms.unit = "ms"
    track_forward_backward_ms.unit = "ms"


class RoIAlignGpu(_RoIGpu):
    """roi_align (aligned) and ps_roi_align on the GPU RoI shape."""

    params = (["roi_align", "ps_roi_align"], list(OUTPUT_SIZES), list(SAMPLING), GPU_IMPLEMENTATIONS)
    param_names = ("op", "output_size", "sampling", "implementation")

    def setup(self, op, output_size, sampling, implementation):
        self.setup_runner(op, output_size, sampling, implementation)


class RoIPoolGpu(_RoIGpu):
    """roi_pool and ps_roi_pool on the GPU RoI shape."""

    params = (["roi_pool", "ps_roi_pool"], list(OUTPUT_SIZES), GPU_IMPLEMENTATIONS)
    param_names = ("op", "output_size", "implementation")

    def setup(self, op, output_size, implementation):
        self.setup_runner(op, output_size, None, implementation)
