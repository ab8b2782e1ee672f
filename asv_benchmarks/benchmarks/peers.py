"""pydeform's speed relative to each op's peer, both timed side by side in one process.

``track_speedup`` is peer time / pydeform time (>= 1: pydeform is faster) for every case that has
a peer (pydeform.benchmark_cases): on the CPU, wall-time medians in alternating blocks of pydeform
(Numba CPU) and ONNX Runtime / the PyTorch decode, forward; on the GPU, CUDA-event medians of each
of pydeform's backends and torchvision / the PyTorch decode, forward and forward + backward.
"""

from pydeform import benchmark_cases as cases_module
from pydeform.benchmark_cases import INPUT_SETS

from .common import FORWARD, FORWARD_BACKWARD, GPU_BACKENDS, GPU_DTYPES, case_by_id, implementation_call, \
    require_cupy_gpu


def _peer_case_ids(device):
    return [case.id for case in cases_module.cases(device=device) if case.peer]


class SpeedupOverPeerCpu:
    params = (_peer_case_ids("cpu"),)
    param_names = ("case",)
    timeout = 300

    def setup(self, case_id):
        case = case_by_id(case_id)
        self.pydeform = implementation_call(case, 0, "float32", FORWARD, "pydeform")
        self.peer = implementation_call(case, 0, "float32", FORWARD, "peer")

    def track_speedup(self, case_id):
        pydeform_seconds, peer_seconds = cases_module.alternating_medians([self.pydeform, self.peer], rounds=3)
        return peer_seconds / pydeform_seconds

    track_speedup.unit = "ratio"


class SpeedupOverPeerGpu:
    params = (_peer_case_ids("gpu"), list(GPU_DTYPES), [FORWARD, FORWARD_BACKWARD], list(GPU_BACKENDS))
    param_names = ("case", "dtype", "direction", "backend")
    timeout = 900

    def setup(self, case_id, dtype, direction, backend):
        self.cupy = require_cupy_gpu()
        case = case_by_id(case_id)
        if dtype not in case.dtypes:
            raise NotImplementedError(f"{case.op} takes no {dtype} inputs")
        self.pydeform, self.peer = (
            [implementation_call(case, seed, dtype, direction, implementation, self.cupy) for seed in range(INPUT_SETS)]
            for implementation in (f"pydeform-{backend}", "peer")
        )

    def track_speedup(self, *params):
        def median_ms(calls):
            return cases_module.cuda_median_ms(self.cupy, lambda index: calls[index % INPUT_SETS](), repeats=20)

        return median_ms(self.peer) / median_ms(self.pydeform)

    track_speedup.unit = "ratio"
