"""CPU speed of instance_mean_loss forward + backward against the same loss written in PyTorch
ops (index_add segment sums, autograd), timed side by side in one process: the calls of the
sides alternate, in a rotating order (so a change of the machine's load reaches all of them),
after two untimed rounds; the median and the least time of each side and both ratios are
reported, torch on as many threads as Numba. pydeform's side is
``pydeform.torch.instance_mean_loss`` with ``.backward()`` (the custom op keeps the forward's
per-instance statistics for its backward, as a training step runs it); the array API's pair
with the statistics passed on is timed beside it. Also the memory the array API's pair
allocates besides its gradient output (traced allocations: NumPy's and the Numba kernels'
per-thread row buffers), which is O(N * K * D + threads * D * W).

Shape: N=8, D=8, 256x256, K=32 instances (labels 0..K on blocks), float32; target ratio >= 5.

Usage: ``python asv_benchmarks/compare_semiconv_cpu.py [--batch N] [--dims D] [--size S]
[--instances K] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import pydeform
from pydeform.benchmark_cases.semiconv import block_labels, torch_instance_mean_loss


def alternating_seconds(functions: dict, repeats: int) -> dict:
    """{name: (median, least) seconds} of ``repeats`` rounds calling each function once, after
    two untimed rounds. Each round starts one function later than the last, so each side
    follows each other side equally often (torch's OpenMP workers spin for a while after its
    parallel ops, slowing whatever runs next)."""
    times = {name: [] for name in functions}
    names = list(functions)
    for round_ in range(repeats + 2):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def measure(batch=8, dims=8, size=256, num_instances=32, repeats=15) -> dict:
    import numba
    import torch

    import pydeform.torch as pt

    torch.set_num_threads(numba.get_num_threads())
    rng = np.random.default_rng(0)
    psi = rng.standard_normal((batch, dims, size, size)).astype(np.float32)
    labels = block_labels(rng, batch, size, num_instances)

    def array_api():
        _, statistics = pydeform.instance_mean_loss(psi, labels, num_instances, return_statistics=True)
        return pydeform.instance_mean_loss_backward(1.0, psi, labels, num_instances, statistics=statistics)

    psi_t = torch.from_numpy(psi).requires_grad_(True)
    labels_t = torch.from_numpy(labels)

    def backward_of(loss):
        def run():
            psi_t.grad = None
            loss(psi_t, labels_t, num_instances).backward()
            return psi_t.grad

        return run

    ours, peer = backward_of(pt.instance_mean_loss), backward_of(torch_instance_mean_loss)
    expected = peer().numpy().copy()
    for got in (ours().numpy(), array_api()):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-9)
    times = alternating_seconds({"pydeform.torch instance_mean_loss fwd+bwd": ours,
                                 "pydeform array API loss + backward(statistics=)": array_api,
                                 "torch index_add loss fwd+bwd": peer}, repeats)
    tracemalloc.start()
    array_api()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ratios = tuple(peer_seconds / our_seconds for peer_seconds, our_seconds in
                   zip(times["torch index_add loss fwd+bwd"], times["pydeform.torch instance_mean_loss fwd+bwd"]))
    return {"times": times, "ratios": ratios, "extra_bytes": peak - psi.nbytes,
            "n_k_d_bytes": batch * num_instances * dims * 8}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    result = measure(args.batch, args.dims, args.size, args.instances, args.repeats)
    for name, (median, least) in result["times"].items():
        print(f"{name}: median {median * 1e3:.2f} ms, best {least * 1e3:.2f} ms")
    print(f"allocated besides the gradient: {result['extra_bytes']} bytes "
          f"(N*K*D float64 = {result['n_k_d_bytes']} bytes)")
    print(f"torch / pydeform.torch: median {result['ratios'][0]:.2f}x, best {result['ratios'][1]:.2f}x")


if __name__ == "__main__":
    main()
