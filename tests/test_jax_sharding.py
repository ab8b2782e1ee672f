"""pydeform.jax on a batch sharded over two (host) devices: under ``shard_map`` and under
``jax.jit`` with ``NamedSharding`` inputs, a DCNv2 layer followed by RoI Align, forward and
gradients, equals the unsharded computation.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before JAX is imported, so
the checks run in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import pydeform.jax as pdj

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    N, PER_SHARD = 4, 2
    x = jnp.asarray(rng.standard_normal((N, 3, 6, 6)))
    offset = jnp.asarray(0.7 * rng.standard_normal((N, 18, 6, 6)))
    mask = jnp.asarray(rng.uniform(0, 1, (N, 9, 6, 6)))
    weight = jnp.asarray(rng.standard_normal((2, 3, 3, 3)))
    # Three rois per shard. Under shard_map a shard sees its own images, so its rois carry batch
    # indices local to it; the unsharded run (and sharded jit, which sees the global batch) gets
    # the global indices.
    local = rng.integers(0, PER_SHARD, (2, 3, 1)).astype(np.float64)
    corners = rng.uniform(0, 3, (2, 3, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 3, (2, 3, 2))], axis=2)
    rois_local = np.concatenate([local, boxes], axis=2).reshape(6, 5)
    rois_global = rois_local.copy()
    rois_global[:, 0] += np.repeat(np.arange(2) * PER_SHARD, 3)
    rois_local, rois_global = jnp.asarray(rois_local), jnp.asarray(rois_global)

    def block(x, offset, mask, weight, rois):
        y = pdj.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        return pdj.roi_align(y, rois, 2, sampling_ratio=2, aligned=True)

    def loss(x, offset, mask, weight, rois):
        return (block(x, offset, mask, weight, rois) ** 2).sum()

    gradient = jax.grad(loss, argnums=(0, 1, 2, 3))
    expected = (jax.jit(block)(x, offset, mask, weight, rois_global),
                *jax.jit(gradient)(x, offset, mask, weight, rois_global))

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    B, R = P("batch"), P()
    specs = dict(mesh=mesh, in_specs=(B, B, B, R, B))
    mapped_block = shard_map(block, out_specs=B, **specs)
    mapped_loss = shard_map(lambda *a: jax.lax.psum(loss(*a), "batch"), out_specs=R, **specs)
    mapped = (jax.jit(mapped_block)(x, offset, mask, weight, rois_local),
              *jax.jit(jax.grad(mapped_loss, argnums=(0, 1, 2, 3)))(x, offset, mask, weight, rois_local))

    sharded = [jax.device_put(a, NamedSharding(mesh, B)) for a in (x, offset, mask)]
    annotated = (jax.jit(block)(*sharded, weight, rois_global), *jax.jit(gradient)(*sharded, weight, rois_global))

    def largest_difference(results):
        return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(results, expected))

    print(json.dumps({
        "shard_map": largest_difference(mapped), "sharded_jit": largest_difference(annotated),
        "scale": max(float(np.abs(np.asarray(e)).max()) for e in expected),
        "shard_map_output_sharded": not mapped[0].sharding.is_fully_replicated,
        "sharded_jit_output_replicated": annotated[0].sharding.is_fully_replicated,
    }))
    """
)


@pytest.fixture(scope="module")
def sharded_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shard_map_equals_the_unsharded_block_gradients_included(sharded_results):
    assert sharded_results["shard_map"] <= 1e-12 * sharded_results["scale"]
    assert sharded_results["shard_map_output_sharded"]


def test_sharding_annotated_jit_equals_the_unsharded_block_gradients_included(sharded_results):
    assert sharded_results["sharded_jit"] <= 1e-12 * sharded_results["scale"]
    # XLA cannot split a callback: it gathers the operands and every device computes the whole
    # op (docs/jax.md), so the result comes back replicated.
    assert sharded_results["sharded_jit_output_replicated"]
