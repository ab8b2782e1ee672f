"""Both bilinear rules of pydeform/backends/cupy_kernels/bilinear.cuh -- value, derivatives and
scatter -- against reference.bilinear, through a test-only probe kernel (cuda_bilinear_probe.cu)
run on the CPU by the host shim and compiled for the GPU types by NVRTC. Rule B has no kernel
of its own yet, so this is where it is checked."""

from pathlib import Path

import numpy as np
import pytest

from pydeform.backends.cupy_kernels._compile import (
    COMPILE_OPTIONS,
    TEMPLATE_ARGUMENTS,
    kernel_source,
    name_expression,
)
from reference.bilinear import border_clamped_corners, gather, scatter_to_corners, zero_padded_corners
from tests import host_shim, nvrtc

PROBE = Path(__file__).resolve().parent / "cuda_bilinear_probe.cu"
PROBE_TEMPLATES = ("bilinear_probe",)
RULES = {"zero_padded": (0, zero_padded_corners), "border_clamped": (1, border_clamped_corners)}
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
HEIGHT, WIDTH = 5, 4


def probe_source():
    return f'{kernel_source("bilinear.cuh")}\n#line 1 "{PROBE.name}"\n{PROBE.read_text()}'


def probe_positions(rng):
    """Random positions around the image plus every edge case of both rules along each axis:
    -1 and the size (outside for rule A, inside for rule B), just beyond them, 0 and size - 1
    (where rule B's clamps start), integers, and NaN."""
    def edges(size):
        return [-1.5, -1.0 - 1e-6, -1.0, -1.0 + 1e-6, -0.5, 0.0, 0.5, size - 1.0, size - 0.5,
                size - 1e-6, float(size), size + 1e-6, size + 0.5, 2.0, np.nan]

    h_edges, w_edges = edges(HEIGHT), edges(WIDTH)
    grid = np.array([(h, w) for h in h_edges for w in w_edges])
    scattered = np.stack([rng.uniform(-2, HEIGHT + 1, 200), rng.uniform(-2, WIDTH + 1, 200)], axis=1)
    return np.concatenate([grid, scattered])


def reference_probe(image, positions, gradients, corners_of):
    corners = corners_of(positions[:, 0], positions[:, 1], HEIGHT, WIDTH)
    sampled = gather(image[None, None], 0, corners)
    samples = np.stack([sampled.values[:, 0], sampled.d_dh[:, 0], sampled.d_dw[:, 0]], axis=1)
    grad_image = np.zeros((1, 1, HEIGHT, WIDTH))
    scatter_to_corners(grad_image, 0, corners, gradients[:, None])
    return samples, grad_image[0, 0]


@pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_reference(rule, dtype):
    flag, corners_of = RULES[rule]
    rng = np.random.default_rng(7)
    image = rng.standard_normal((HEIGHT, WIDTH)).astype(dtype)
    positions = probe_positions(rng).astype(dtype)
    gradients = rng.standard_normal(len(positions)).astype(dtype)
    samples = np.full((len(positions), 3), np.nan, dtype=dtype)
    grad_image = np.zeros_like(image)
    args = (np.int64(len(positions)), image, np.int64(HEIGHT), np.int64(WIDTH), positions,
            np.int32(flag), gradients, samples, grad_image)
    library = host_shim.load_library("bilinear_probe", probe_source(), PROBE_TEMPLATES)
    host_shim.run_kernel(library, "bilinear_probe", dtype, args)

    expected_samples, expected_grad = reference_probe(image, positions.astype(np.float64),
                                                      gradients.astype(np.float64), corners_of)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(samples, expected_samples, rtol=tolerance, atol=tolerance * 10)
    np.testing.assert_allclose(grad_image, expected_grad, rtol=tolerance, atol=tolerance * 100)


@pytest.mark.skipif(not nvrtc.available(), reason="needs NVRTC and CUDA's headers (the test extras)")
@pytest.mark.parametrize("type_name", TEMPLATE_ARGUMENTS.values())
def test_probe_compiles_for_every_storage_type(type_name):
    """Instantiates both rules for each storage type (deform_conv.cu uses rule A only)."""
    result = nvrtc.compile_source(probe_source(), PROBE.name, 80,
                                  [name_expression(t, type_name) for t in PROBE_TEMPLATES],
                                  COMPILE_OPTIONS)
    assert not result.log.strip(), result.log
