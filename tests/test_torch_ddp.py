"""pydeform.torch modules under ``torch.nn.parallel.DistributedDataParallel``: two processes
(gloo, CPU) training a DCNv2 + RoI Align block on half a batch each reach the parameters of one
process training on the whole batch.

The single-process run comes first, in the test process, so that the spawned ranks load the
kernels it compiled from the disk cache instead of compiling them twice at once.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

WORLD = 2
PER_RANK = 2  # images per rank
ROIS_PER_IMAGE = 2
STEPS = 3


class Block(torch.nn.Module):
    """DCNv2 (offsets and mask from its own convolution), then RoI Align and a linear head."""

    def __init__(self):
        super().__init__()
        self.dcn = pt.ModulatedDeformConv2dPack(3, 4, 3, padding=1)
        self.pool = pt.RoIAlign(2, 1.0, 2, aligned=True)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x, rois):
        return self.head(self.pool(torch.relu(self.dcn(x)), rois).flatten(1))


def _model() -> Block:
    torch.manual_seed(0)
    model = Block().double()
    with torch.no_grad():  # non-zero offsets from the first step on
        torch.nn.init.normal_(model.dcn.conv_offset.weight, std=0.1)
    return model


def _batch(rank: int):
    """Rank ``rank``'s images, rois (batch indices local to the rank) and targets."""
    rng = np.random.default_rng(10 + rank)
    x = torch.from_numpy(rng.standard_normal((PER_RANK, 3, 8, 8)))
    corners = rng.uniform(0, 4, (PER_RANK * ROIS_PER_IMAGE, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 4, corners.shape)], axis=1)
    index = np.repeat(np.arange(PER_RANK), ROIS_PER_IMAGE)[:, None].astype(np.float64)
    rois = torch.from_numpy(np.concatenate([index, boxes], axis=1))
    target = torch.from_numpy(rng.standard_normal((PER_RANK * ROIS_PER_IMAGE, 1)))
    return x, rois, target


def _train(model, batches) -> dict:
    """SGD on the mean squared error; each batch's loss is a mean over its rois."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        for x, rois, target in batches:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x, rois), target).backward()
            optimizer.step()
    module = getattr(model, "module", model)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _whole_batch():
    """Every rank's images concatenated, their rois' batch indices shifted to match."""
    parts = [_batch(rank) for rank in range(WORLD)]
    x = torch.cat([p[0] for p in parts])
    rois = torch.cat([p[1] + torch.tensor([rank * PER_RANK, 0, 0, 0, 0.0]) for rank, p in enumerate(parts)])
    return x, rois, torch.cat([p[2] for p in parts])


def _rank(rank: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        results[rank] = _train(model, [_batch(rank)])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_matches_one_process_on_the_whole_batch():
    # DDP averages the ranks' gradients: with equal halves, the mean of the halves' mean losses'
    # gradients is the whole batch's mean loss gradient.
    expected = _train(_model(), [_whole_batch()])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=WORLD, join=True)
        ranks = [dict(results[rank]) for rank in range(WORLD)]
    initial = _model().state_dict()
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        for rank in ranks:
            torch.testing.assert_close(rank[name], value, rtol=1e-12, atol=1e-12, msg=name)
