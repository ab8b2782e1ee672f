"""The snakes' ``iter_callback`` on every backend: called ``num_iter + 1`` times (before the first
iteration and after each), batched with the whole batch, with a copy (changing it leaves the run
unchanged), for MorphACWE and MorphGAC: on the Numba CPU kernels, on the CUDA C kernels through
the host shim, on (fake) CuPy arrays with both GPU kernel sets, and, gpu-marked, on a real GPU.
The Numba CUDA kernels run a callback count in the simulator
(numba_cuda_simulator_levelset_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fake_cupy import fake_gpu  # noqa: F401 (a fixture)
from pydeform import levelset
from tests.levelset_cases import kernels_named

SNAKES = {"acwe": lambda image, init, **kw: levelset.morphological_chan_vese(image, 3, init, 1, **kw),
          "gac": lambda image, init, **kw: levelset.morphological_geodesic_active_contour(image, 3, init, 1, "auto",
                                                                                          -1, **kw)}


def check_callbacks(snake, image, init, xp=np, to_host=np.asarray):
    """``snake`` with a callback that records a host copy of each level set, then overwrites it."""
    seen = []

    def callback(u):
        seen.append(to_host(u).copy())
        u[...] = 1 - u

    result = snake(xp.asarray(image), xp.asarray(init), iter_callback=callback)
    plain = snake(xp.asarray(image), xp.asarray(init))
    np.testing.assert_array_equal(to_host(result), to_host(plain))
    assert len(seen) == 4
    assert all(u.shape == image.shape and u.dtype == np.int8 for u in seen)
    np.testing.assert_array_equal(seen[0], (init > 0) * np.ones(image.shape, np.int8))
    np.testing.assert_array_equal(seen[-1], to_host(plain))


def inputs(batch):
    rng = np.random.default_rng(0)
    shape = (2, 5, 6) if batch else (5, 6)
    return rng.integers(0, 9, shape).astype(np.float64), rng.standard_normal(shape)


@pytest.mark.parametrize("kernels", ["numba-cpu", "host-shim"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("snake", SNAKES)
def test_callbacks(kernels, batched, snake):
    with kernels_named(kernels):
        check_callbacks(lambda *a, **kw: SNAKES[snake](*a, batched=batched, **kw), *inputs(batched))


@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("snake", SNAKES)
def test_fake_gpu_callbacks_get_gpu_copies(fake_gpu, backend, snake):
    """The kernels do not run on the stand-ins; the driver calls back num_iter + 1 times with a
    fresh CuPy array each time."""
    image, init = inputs(False)
    seen = []
    SNAKES[snake](fake_gpu.asarray(image), fake_gpu.asarray(init), iter_callback=seen.append, backend=backend)
    assert len(seen) == 4 and all(isinstance(u, fake_gpu.ndarray) for u in seen)
    assert len({id(u.array) for u in seen}) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("snake", SNAKES)
def test_gpu_callbacks(backend, batched, snake):
    import cupy

    check_callbacks(lambda *a, **kw: SNAKES[snake](*a, batched=batched, backend=backend, **kw), *inputs(batched),
                    xp=cupy, to_host=cupy.asnumpy)
