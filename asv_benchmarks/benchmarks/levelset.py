"""The level-set ops on the standard shapes (pydeform.benchmark_cases.levelset):
morphological_chan_vese 512x512 (35 iterations, smoothing 3), 64^3 (10 iterations) and a batch of
64 images of 128x128 in one call; morphological_geodesic_active_contour 512x512 (100 iterations,
balloon -1); chan_vese 512x512 (200 iterations). Peers: scikit-image on the CPU, cuCIM on the GPU
(where installed), pydeform's single-image call in a loop for the batch. On the GPU,
LaunchesPerIterationGpu tracks the kernels the CuPy backend launches per iteration."""

from pydeform import benchmark_cases as cases_module

from .common import _CpuOp, _GpuOp, case_by_id, cpu_params, gpu_params, require_cupy_gpu


class MorphologicalChanVeseGpu(_GpuOp):
    op = "morphological_chan_vese"
    params = gpu_params(op)


class MorphologicalChanVeseCpu(_CpuOp):
    op = "morphological_chan_vese"
    params = cpu_params(op)


class MorphologicalGeodesicActiveContourGpu(_GpuOp):
    op = "morphological_geodesic_active_contour"
    params = gpu_params(op)


class MorphologicalGeodesicActiveContourCpu(_CpuOp):
    op = "morphological_geodesic_active_contour"
    params = cpu_params(op)


class ChanVeseGpu(_GpuOp):
    op = "chan_vese"
    params = gpu_params(op)


class ChanVeseCpu(_CpuOp):
    op = "chan_vese"
    params = cpu_params(op)


class LaunchesPerIterationGpu:
    """Kernel launches per iteration of the CuPy backend (float32 inputs)."""

    params = ([case.id for case in cases_module.cases(device="gpu") if case.launches is not None],)
    param_names = ("case",)

    def setup(self, case_id):
        self.cupy = require_cupy_gpu()
        self.case = case_by_id(case_id)
        self.arrays = cases_module.device_inputs(cases_module.host_inputs(self.case), "float32", self.cupy)

    def track_launches(self, case_id):
        return self.case.launches(self.case, self.arrays, "cupy")

    track_launches.unit = "launches"
