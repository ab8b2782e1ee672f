"""Type-check and compile the Numba CUDA CenterNet kernels to PTX, without a GPU.

As in tests/test_numba_ptx.py, whose child-process helpers it uses: ``NumbaCudaCenterNetKernels``
is driven on small NumPy arrays of every GPU dtype with its launcher replaced by a recorder, and
``numba.typeof`` of the recorded arguments is the signature given to ``numba.cuda.compile_ptx``
for sm_70, sm_80 and sm_90, in a child process (this file run as a script) where the current
device's compute capability is the target's; the tests here judge what the child reports.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.test_numba_ptx import (
    ARITHMETIC,
    COMPUTE_CAPABILITIES,
    DTYPES,
    check_float32_only,
    child_results,
    compile_kernel,
    target_compute_capability,
)

KERNELS = ("candidates", "merge", "targets", "focal_partials", "focal_total", "grad")


def record_launches(dtype_name: str) -> list:
    """(kernel name, kernel, arguments) of every launch of one decode with and one without reg,
    one targets call (boxes in the accumulation dtype) and one focal loss forward and backward."""
    import ml_dtypes
    import numpy as np

    from pydeform.backends.numba_kernels import centernet as kernels_module
    from tests.centernet_cases import build_decode_case, build_focal_case, build_targets_case

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    acc = np.dtype(ARITHMETIC[dtype_name])
    names = {id(kernel): name for kernel, name in zip(kernels_module.cuda_kernels(acc), KERNELS)}
    launches = []

    def recorder(kernel, n_items, xp, *args):
        launches.append((names[id(kernel)], kernel, args))

    kernels_module.launch_cuda = recorder
    kernels = kernels_module.NumbaCudaCenterNetKernels(xp=np, chunk=8)
    rng = np.random.default_rng(0)
    for with_reg in (True, False):
        case = build_decode_case(rng, acc, with_reg=with_reg, K=4)
        case = case.map_arrays(lambda a: a.astype(dtype))
        kernels.decode(case.heat, case.wh, case.reg, np.zeros((2, 4, 6), acc), case.params())
    targets = build_targets_case(rng, acc)
    batch, slots = targets.labels.shape[0], targets.max_objects
    kernels.targets(targets.boxes, targets.labels.astype(np.int64), np.zeros((batch, 3, 8, 10), acc),
                    np.zeros((batch, slots, 2), acc), np.zeros((batch, slots, 2), acc),
                    np.zeros((batch, slots), np.int64), np.zeros((batch, slots), np.uint8), targets.params())
    focal = build_focal_case(rng, acc).map_arrays(lambda a: a.astype(dtype))
    sums = np.zeros(3, acc)
    kernels.focal_loss_sums(focal.pred, focal.target, sums, focal.params())
    kernels.focal_loss_grad(focal.grad_output, focal.pred, focal.target, sums, np.zeros(focal.pred.shape, dtype),
                            focal.params())
    return launches


def compile_all(cc: tuple) -> dict:
    """Child process: ``{dtype: {kernel: {"signature", "return", "target", "atomics"} or
    {"error"}}}``, and under ``"launches"`` each dtype's launched kernels in order."""
    import numba

    target_compute_capability(cc)
    results = {"launches": {}}
    for dtype_name in DTYPES:
        per_kernel = results.setdefault(dtype_name, {})
        launches = record_launches(dtype_name)
        results["launches"][dtype_name] = [name for name, _, _ in launches]
        for name, kernel, args in launches:
            entry = compile_kernel(kernel, tuple(numba.typeof(arg) for arg in args), cc)
            previous = per_kernel.setdefault(name, entry)
            assert previous["signature"] == entry["signature"], f"{dtype_name} {name}: two signatures"
    return results


@pytest.fixture(scope="module", params=COMPUTE_CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def compiled(request):
    return request.param, child_results(__file__, request.param)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_call_is_at_most_two_launches(compiled, dtype):
    """Two decodes (two launches each: candidates, then merge with gather and boxes), targets (one),
    focal loss sums (two) and gradient (one): nothing else is launched by the kernel set."""
    assert compiled[1]["launches"][dtype] == ["candidates", "merge", "candidates", "merge", "targets",
                                              "focal_partials", "focal_total", "grad"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_centernet_kernel_compiles_to_ptx(compiled, dtype, kernel):
    """Compiled for the child's compute capability, returns nothing, float arrays only in the
    arithmetic dtype (half types are converted before a launch), flat C-contiguous arrays, and
    atomics only in the targets kernel (its heatmap max), none in the decode or the focal loss
    (whose sums are deterministic), and no float64 instruction where the arithmetic is float32
    (but in the targets kernel)."""
    cc, results = compiled
    entry = results[dtype][kernel]
    assert "error" not in entry, f"{kernel} ({dtype}) {entry['signature']}:\n{entry['error']}"
    assert entry["return"] == "none"
    assert entry["target"] == [f"sm_{cc[0]}{cc[1]}"]
    arrays = re.findall(r"Array\((\w+), (\d+), '(\w)'", entry["signature"])
    floats = {a for a in arrays if a[0].startswith("float")}
    assert floats == {(ARITHMETIC[dtype], "1", "C")}, entry["signature"]
    assert {a[1:] for a in arrays} == {("1", "C")}, entry["signature"]
    # Numba has no native float atomic max: a compare-and-swap loop on the value's bits.
    expected = [f"atom.global.cas.b{ARITHMETIC[dtype][-2:]}"] if kernel == "targets" else []
    assert entry["atomics"] == expected
    if kernel != "targets":  # float64 geometry by design, as in the CUDA C kernel (exact radius and centre)
        check_float32_only(entry, dtype, kernel)


if __name__ == "__main__":
    major, minor = sys.argv[1].split(".")
    print(json.dumps(compile_all((int(major), int(minor)))))
