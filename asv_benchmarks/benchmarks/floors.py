"""The achieved fraction of the bandwidth floor of the GPU forwards that define one
(pydeform.benchmark_cases.floor_bytes): centernet_decode (the heatmap read once) and roi_align
(every input pixel a sample reads, once, and the output written once).

``track_fraction`` is floor time / measured time, the floor time being the floor's bytes at the
device bandwidth measured in the same process (a device-to-device copy); 1 would be the
forward moving only what it must, at full bandwidth. The peer's fraction is tracked beside
pydeform's.
"""

from pydeform import benchmark_cases as cases_module
from pydeform.benchmark_cases import INPUT_SETS

from .common import FORWARD, GPU_BACKENDS, GPU_DTYPES, case_by_id, implementation_call, require_cupy_gpu


class BandwidthFloorGpu:
    params = ([case.id for case in cases_module.cases(device="gpu") if case.floor is not None], list(GPU_DTYPES),
              [f"pydeform-{backend}" for backend in GPU_BACKENDS] + ["peer"])
    param_names = ("case", "dtype", "implementation")
    timeout = 900

    def setup(self, case_id, dtype, implementation):
        self.cupy = require_cupy_gpu()
        self.case = case_by_id(case_id)
        if dtype not in self.case.dtypes:
            raise NotImplementedError(f"{self.case.op} takes no {dtype} inputs")
        self.calls = [implementation_call(self.case, seed, dtype, FORWARD, implementation, self.cupy)
                      for seed in range(INPUT_SETS)]
        self.floor_bytes = cases_module.floor_bytes(self.case, dtype)

    def track_fraction(self, *params):
        floor_seconds = self.floor_bytes / cases_module.copy_bandwidth(self.cupy)
        measured_ms = cases_module.cuda_median_ms(self.cupy, lambda index: self.calls[index % INPUT_SETS]())
        return floor_seconds * 1e3 / measured_ms

    track_fraction.unit = "fraction"
