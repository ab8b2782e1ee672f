"""The semi-convolutional ops' benchmark cases, on embeddings of N=8 images of 256x256 with D=8
channels and K=32 instances (labels 0..K on a grid of blocks) on both devices:

- instance_mean_loss forward + backward (the backward taking the forward's statistics, as a
  training step runs it) beside the same loss written in PyTorch ops (index_add segment sums,
  autograd), on the CPU and on the GPU; instance_means (forward);
- affinity (laplacian, sigma per center) to the K=32 centers, forward + backward (on the CPU
  N=2 images of 128x128 and K=16 centers);
- seeded_mask_logits on R=128 regions of 28x28 (softmax seed), forward + backward;
- hough_votes of phi with coordinates=True on the foreground (half the pixels), hough_peaks of
  K=32 peaks on a 256x256 vote map, assign_to_centers to K=32 centers, semiconv_embed.
"""

from __future__ import annotations

import numpy as np

from .common import (
    CPU_DTYPES, GPU_DTYPES, Calls, Case, normal, require_torch, torch_autograd_calls, torch_dtype, uniform,
)

OPS = ("semiconv_embed", "instance_means", "instance_mean_loss", "affinity", "seeded_mask_logits", "hough_votes",
       "hough_peaks", "assign_to_centers")
#: No semi-convolutional op uses float atomics: every backward is deterministic already.
DETERMINISTIC_OPS = ()
TORCH_LOSS = "the loss in PyTorch ops (index_add, autograd)"

BATCH, DIMS, SIZE, INSTANCES = 8, 8, 256, 32
REGIONS, REGION_SIZE = 128, 28


def torch_instance_mean_loss(psi, labels, num_instances):
    """The "mean" instance mean loss in PyTorch ops: per-instance sums by index_add over
    segment ids ``n * (K + 1) + label`` (the background is a segment left out of the loss)."""
    import torch

    n, dims, height, width = psi.shape
    segments = (labels.reshape(n, -1) + torch.arange(n, device=psi.device).reshape(n, 1) * (num_instances + 1))
    segments = segments.reshape(-1)
    pixels = psi.reshape(n, dims, -1).transpose(1, 2).reshape(-1, dims)
    total = n * (num_instances + 1)
    sizes = torch.bincount(segments, minlength=total)
    counts = sizes.to(psi.dtype).clamp(min=1)
    means = torch.zeros(total, dims, dtype=psi.dtype, device=psi.device).index_add(0, segments, pixels)
    means = means / counts[:, None]
    norms = torch.linalg.vector_norm(pixels - means[segments], dim=1)
    losses = torch.zeros(total, dtype=psi.dtype, device=psi.device).index_add(0, segments, norms) / counts
    nonempty = (sizes.reshape(n, -1)[:, 1:] > 0).sum().clamp(min=1)
    return losses.reshape(n, -1)[:, 1:].sum() / nonempty


def block_labels(rng, batch, size, num_instances):
    """Labels 0..K on a grid of blocks (each image its own shuffle), int64 [N, S, S]."""
    side = int(np.ceil(np.sqrt(num_instances + 1)))
    cell = -(-size // side)
    blocks = np.stack([rng.permutation(side * side) % (num_instances + 1) for _ in range(batch)])
    grid = blocks.reshape(batch, side, side).repeat(cell, axis=1).repeat(cell, axis=2)
    return np.ascontiguousarray(grid[:, :size, :size]).astype(np.int64)


def _instance_inputs(backward):
    def build(seed):
        rng = np.random.default_rng(seed)
        arrays = {"psi": normal(rng, (BATCH, DIMS, SIZE, SIZE)), "labels": block_labels(rng, BATCH, SIZE, INSTANCES)}
        if backward:
            arrays["grad_output"] = np.asarray(1.0 + rng.random(), np.float32)
        return arrays

    return build


def _loss_calls(case, arrays, backend):
    """pydeform's loss; forward + backward passes the forward's statistics to the backward."""
    import pydeform

    psi, labels = arrays["psi"], arrays["labels"]

    def forward():
        return pydeform.instance_mean_loss(psi, labels, **case.options, backend=backend)

    def forward_backward():
        _, statistics = pydeform.instance_mean_loss(psi, labels, **case.options, return_statistics=True,
                                                    backend=backend)
        return pydeform.instance_mean_loss_backward(arrays["grad_output"], psi, labels, **case.options,
                                                    statistics=statistics, backend=backend)

    return Calls(forward, forward_backward)


def _torch_loss_calls(case, host, dtype):
    """:func:`torch_instance_mean_loss` on CUDA (GPU cases) or CPU tensors, its backward through
    autograd."""
    torch = require_torch(cuda=case.device == "gpu")
    device = "cuda" if case.device == "gpu" else "cpu"
    psi = torch.from_numpy(host["psi"]).to(device, torch_dtype(torch, dtype)).requires_grad_()
    labels = torch.from_numpy(host["labels"]).to(device)
    grad_output = torch.from_numpy(host["grad_output"]).to(device)
    return torch_autograd_calls(torch, lambda: torch_instance_mean_loss(psi, labels, case.options["num_instances"]),
                                [psi], grad_output)


def _affinity_inputs(batch, size, centers):
    def build(seed):
        rng = np.random.default_rng(seed)
        return {"psi": normal(rng, (batch, DIMS, size, size)), "centers": normal(rng, (batch, centers, DIMS)),
                "sigma": uniform(rng, 0.5, 2.0, (batch, centers)),
                "grad_output": normal(rng, (batch, centers, size, size))}

    return build


def _seeded_inputs(seed):
    rng = np.random.default_rng(seed)
    shape = (REGIONS, REGION_SIZE, REGION_SIZE)
    return {"scores": normal(rng, shape), "psi": normal(rng, (REGIONS, DIMS, REGION_SIZE, REGION_SIZE)),
            "grad_output": normal(rng, shape)}


def _embed_inputs(seed):
    return {"phi": normal(np.random.default_rng(seed), (BATCH, DIMS, SIZE, SIZE))}


def _votes_inputs(seed):
    """Displacements of up to 8 pixels (phi, coordinates added by the op) on half the pixels."""
    rng = np.random.default_rng(seed)
    return {"psi": uniform(rng, -8.0, 8.0, (BATCH, 2, SIZE, SIZE)), "foreground": rng.random((BATCH, SIZE, SIZE)) < 0.5}


def _peaks_inputs(seed):
    rng = np.random.default_rng(seed)
    return {"votes": rng.integers(0, 20, (BATCH, SIZE, SIZE)).astype(np.int32)}


def _assign_inputs(seed):
    rng = np.random.default_rng(seed)
    return {"psi": normal(rng, (BATCH, DIMS, SIZE, SIZE)), "foreground": rng.random((BATCH, SIZE, SIZE)) < 0.5,
            "centers": normal(rng, (BATCH, INSTANCES, DIMS))}


def standard_cases():
    images = f"N={BATCH}, D={DIMS}, {SIZE}x{SIZE}"
    name = f"N{BATCH}-D{DIMS}-{SIZE}x{SIZE}"
    instances = {"num_instances": INSTANCES}
    for device, dtypes in (("gpu", GPU_DTYPES), ("cpu", CPU_DTYPES)):
        yield Case("semiconv_embed", name, device, images, dtypes, _embed_inputs, {}, False, None)
        yield Case("instance_means", f"{name}-K{INSTANCES}", device, f"{images}, K={INSTANCES}", dtypes,
                   _instance_inputs(False), instances, False, None)
        yield Case("instance_mean_loss", f"{name}-K{INSTANCES}", device,
                   f"{images}, K={INSTANCES}, mean; the backward takes the forward's statistics", dtypes,
                   _instance_inputs(True), instances, True, TORCH_LOSS, peer_builder=_torch_loss_calls,
                   pydeform_builder=_loss_calls)
        # The affinities are [N, K, H, W]: a quarter of the images and half the centers on the CPU.
        batch, size, centers = (BATCH, SIZE, INSTANCES) if device == "gpu" else (2, SIZE // 2, INSTANCES // 2)
        yield Case("affinity", f"N{batch}-D{DIMS}-{size}x{size}-K{centers}", device,
                   f"N={batch}, D={DIMS}, {size}x{size}, K={centers} centers, laplacian, sigma [N, K]", dtypes,
                   _affinity_inputs(batch, size, centers), {"kernel": "laplacian"}, True, None)
        yield Case("seeded_mask_logits", f"R{REGIONS}-D{DIMS}-{REGION_SIZE}x{REGION_SIZE}", device,
                   f"R={REGIONS} regions, D={DIMS}, {REGION_SIZE}x{REGION_SIZE}, softmax seed, sigma 1.5", dtypes,
                   _seeded_inputs, {"sigma": 1.5, "mode": "softmax"}, True, None)
        yield Case("hough_votes", f"N{BATCH}-{SIZE}x{SIZE}", device,
                   f"N={BATCH}, {SIZE}x{SIZE}, coordinates=True, half the pixels voting", dtypes, _votes_inputs,
                   {"coordinates": True}, False, None)
        # int32 votes: the dtype does not apply.
        yield Case("hough_peaks", f"N{BATCH}-{SIZE}x{SIZE}-K{INSTANCES}", device,
                   f"N={BATCH}, {SIZE}x{SIZE} int32 votes, K={INSTANCES}, 3x3 peaks", ("float32",), _peaks_inputs,
                   {"K": INSTANCES}, False, None)
        yield Case("assign_to_centers", f"{name}-K{INSTANCES}", device,
                   f"{images}, K={INSTANCES} centers, half the pixels foreground", dtypes, _assign_inputs, {}, False,
                   None)
