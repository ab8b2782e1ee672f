"""Every kernel template of every ``.cu`` file in pydeform/backends/cupy_kernels compiles with
NVRTC for each storage type and several architectures, without a GPU (tests/nvrtc.py).

Kernel sets declare their ``.cu`` file and templates in a ``KERNELS`` manifest, the one list
CuPy compiles from too; a new kernel-set module is picked up here automatically.
"""

import functools
import importlib
import pkgutil
import re

import numpy as np
import pytest

from pydeform.backends import cupy_kernels
from pydeform.backends.cupy_kernels import centernet, deform_conv, deform_pool, roi
from pydeform.backends.cupy_kernels._compile import (
    COMPILE_OPTIONS,
    KERNEL_DIR,
    TEMPLATE_ARGUMENTS,
    THREADS_PER_BLOCK,
    KernelManifest,
    kernel_source,
    name_expression,
)
from pydeform.centernet import CenterNetDecodeParams, CenterNetTargetsParams, FocalLossParams
from pydeform.deform_conv import DeformConv2dGeometry
from pydeform.deform_unet import DeformPool2dGeometry
from pydeform.roi import DeformPSRoIPoolParams, DeformRoIPoolParams, RoIAlignParams, RoIPoolParams
from tests import nvrtc

pytestmark = pytest.mark.skipif(
    not nvrtc.available(), reason="needs NVRTC and CUDA's headers (the test extras)"
)

ARCHS = (70, 80, 90)
# NVRTC's notice for compute_70, which CUDA 12 still supports.
ARCH_DEPRECATION = "Architectures prior to '<compute/sm>_75' are deprecated"


def kernel_manifests():
    manifests = []
    for module_info in pkgutil.iter_modules(cupy_kernels.__path__):
        module = importlib.import_module(f"{cupy_kernels.__name__}.{module_info.name}")
        manifest = getattr(module, "KERNELS", None)
        if isinstance(manifest, KernelManifest):
            manifests.append(manifest)
    return manifests


MANIFESTS = kernel_manifests()


@functools.lru_cache(maxsize=None)
def compile_manifest(manifest, type_name, arch):
    """(name expressions, NVRTC result); cached, as several tests read one compilation."""
    expressions = [name_expression(t, type_name) for t in manifest.templates]
    return expressions, nvrtc.compile_source(
        kernel_source(manifest.source), manifest.source, arch, expressions, COMPILE_OPTIONS
    )


def test_every_cu_file_has_a_manifest():
    assert sorted(m.source for m in MANIFESTS) == sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("type_name", TEMPLATE_ARGUMENTS.values())
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.source)
def test_kernels_compile(manifest, type_name, arch):
    if arch < 75 and nvrtc.nvrtc_version() >= (13, 0):
        pytest.skip("CUDA 13 no longer targets compute_70")
    expressions, result = compile_manifest(manifest, type_name, arch)
    entries = nvrtc.entry_parameter_sizes(result.ptx)
    for expression in expressions:
        assert result.lowered_names[expression] in entries, expression
    warnings = [line for line in result.log.splitlines() if line and ARCH_DEPRECATION not in line]
    assert not warnings, result.log


def argument_sizes(args):
    """Bytes each marshalled argument occupies in the kernel's parameter buffer: a NumPy scalar
    its own size, an array or None (a null pointer) a pointer's."""
    return [a.itemsize if isinstance(a, np.generic) else 8 for a in args]


TYPE_NAMES = {np.float32: "float", np.float64: "double", np.float16: "__half"}


def assert_arguments_match_kernel_parameters(manifest, type_name, launches):
    """``launches`` ((template, count, args) of every kernel of ``manifest``) marshal as many
    arguments, of the same widths, as the kernels compiled for ``type_name`` take."""
    _, result = compile_manifest(manifest, type_name, 80)
    entries = nvrtc.entry_parameter_sizes(result.ptx)
    assert sorted(template for template, _, _ in launches) == sorted(manifest.templates)
    for template, _, args in launches:
        lowered = result.lowered_names[name_expression(template, type_name)]
        assert argument_sizes(args) == entries[lowered], template


def deform_conv2d_launches(with_mask):
    g = DeformConv2dGeometry(4, 5, 6, 2, 3, 2, 1, 1, 1, 0, 1, 1, 1, 2, 5, 5)
    empty = np.empty((1, 1, 1, 1), dtype=np.float32)
    mask = empty if with_mask else None
    return [
        deform_conv.im2col_launch(empty, empty, mask, empty, g),
        deform_conv.col2im_coord_launch(empty, empty, mask, empty, empty, mask, g),
        deform_conv.col2im_launch(empty, mask, empty, empty, g),
    ]


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("type_name", ["float", "__half"])
def test_deform_conv2d_arguments_match_kernel_parameters(with_mask, type_name):
    """The marshalled argument tuples have the count and widths of the compiled kernels'
    parameters (a width mismatch would pass on the host shim's x86-64 registers)."""
    launches = deform_conv2d_launches(with_mask)
    assert_arguments_match_kernel_parameters(deform_conv.KERNELS, type_name, launches)
    for _, n_items, args in launches:
        assert args[0] == n_items


def deform_pool2d_launches(optional_present):
    """Every deform_pool2d kernel's marshalled arguments, mask and indices present or not."""
    g = DeformPool2dGeometry(4, 5, 6, 2, 3, 2, 1, 1, 1, 1, 2, 2, 3, 5)
    a = np.empty((1, 1, 1, 1), dtype=np.float32)
    opt = a if optional_present else None
    return [
        deform_pool.forward_launch(a, a, opt, a, opt, g, optional_present),
        deform_pool.backward_input_launch(a, opt, a, opt, a, g, optional_present),
        deform_pool.backward_coord_launch(a, a, opt, a, opt, a, opt, g, optional_present),
    ]


@pytest.mark.parametrize("optional_present", [True, False])
@pytest.mark.parametrize("type_name", ["float", "__half"])
def test_deform_pool2d_arguments_match_kernel_parameters(optional_present, type_name):
    launches = deform_pool2d_launches(optional_present)
    assert_arguments_match_kernel_parameters(deform_pool.KERNELS, type_name, launches)
    for _, n_items, args in launches:
        assert args[0] == n_items


def roi_launches(dtype, optional_present):
    """Every RoI kernel's marshalled arguments, the optional offset / mask / trans present or not."""
    a = np.empty((2, 4, 5, 6), dtype=dtype)
    opt = a if optional_present else None
    align = RoIAlignParams(4, 5, 6, 2, 2, 1, 0.5, 2, True, False, True)
    pool = RoIPoolParams(4, 5, 6, 2, 3, 4, 0.25, False)
    deform = DeformRoIPoolParams(4, 5, 6, 2, 3, 0.5, 0, 0.1, optional_present, optional_present)
    psroi = DeformPSRoIPoolParams(4, 5, 6, 1, 2, 3, 2, 2, 0.1, 0.5, 1, optional_present)
    return [
        roi.roi_align_forward_launch(a, a, a, align),
        roi.roi_align_backward_launch(a, a, a, a, align),
        roi.roi_pool_forward_launch(a, a, a, pool),
        roi.roi_pool_backward_launch(a, a, a, a, pool),
        roi.deform_roi_pool_forward_launch(a, a, opt, opt, a, deform),
        roi.deform_roi_pool_backward_launch(a, a, a, opt, opt, a, opt, opt, deform),
        roi.deform_psroi_pool_forward_launch(a, a, opt, a, psroi),
        roi.deform_psroi_pool_backward_launch(a, a, a, opt, a, opt, psroi),
    ]


@pytest.mark.parametrize("optional_present", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_roi_arguments_match_kernel_parameters(dtype, optional_present):
    """As above for roi.cu, whose float parameters are in the accumulation type: 4 bytes for
    float and __half storage, 8 for double."""
    launches = roi_launches(dtype, optional_present)
    assert_arguments_match_kernel_parameters(roi.KERNELS, TYPE_NAMES[dtype], launches)
    for _, n_items, args in launches:
        assert args[0] == n_items


def centernet_launches(dtype, with_reg):
    """Every CenterNet kernel's marshalled arguments, reg present or not."""
    a = np.empty((2, 3, 4, 5), dtype=dtype)
    decode = CenterNetDecodeParams(2, 3, 4, 5, 7, 3, True, with_reg, 4.0, True, 0.5)
    tiles = centernet.decode_tiles(decode, 16)
    targets = CenterNetTargetsParams(2, 4, 3, 8, 10, 4.0, 0.7, 5)
    focal = FocalLossParams(2.0, 4.0)
    return [
        centernet.decode_candidates_launch(a, a, a, decode, tiles),
        centernet.decode_detections_launch(a, a if with_reg else None, a, a, a, decode, tiles),
        centernet.targets_launch(a, a, a, a, a, a, a, targets),
        centernet.focal_loss_partials_launch(a, a, a, focal),
        centernet.focal_loss_total_launch(a, a),
        centernet.focal_loss_grad_launch(a, a, a, a, a, focal),
    ]


@pytest.mark.parametrize("with_reg", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_centernet_arguments_match_kernel_parameters(dtype, with_reg):
    """As above for centernet.cu: decode / focal float parameters in the accumulation type, the
    targets' down_ratio / min_overlap in double."""
    assert_arguments_match_kernel_parameters(centernet.KERNELS, TYPE_NAMES[dtype], centernet_launches(dtype, with_reg))


def cu_constant(source, name):
    match = re.search(rf"constexpr int {name} = (\d+);", (KERNEL_DIR / source).read_text())
    assert match, f"{name} not found in {source}"
    return int(match.group(1))


def test_centernet_python_constants_match_the_cuda_source():
    """The candidate lists are sized in Python with the shared-array capacity of the tile kernel,
    and no launch may have more threads than its shared per-thread arrays hold."""
    assert centernet.DECODE_TILE == cu_constant("centernet.cu", "kDecodeTile")
    assert THREADS_PER_BLOCK <= cu_constant("centernet.cu", "kMaxBlockThreads")
    # The block scan packs two counts of at most a tile into the halves of an int.
    assert centernet.DECODE_TILE < 2**15


@pytest.mark.skipif(nvrtc.ptxas_path() is None, reason="needs ptxas (nvidia-cuda-nvcc wheel)")
@pytest.mark.parametrize("type_name", TEMPLATE_ARGUMENTS.values())
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.source)
def test_kernels_keep_everything_in_registers(manifest, type_name):
    """No stack frame and no spills on sm_80: per-thread arrays (the four bilinear corners)
    must be fully unrolled into registers, never placed in slow local memory."""
    expressions, result = compile_manifest(manifest, type_name, 80)
    resources = nvrtc.kernel_resources(result.ptx, 80)
    for expression in expressions:
        used = resources[result.lowered_names[expression]]
        assert used.stack_frame_bytes == 0 and used.spill_bytes == 0, (expression, used)
