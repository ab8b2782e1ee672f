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

from pydeform._contributions import ContributionLists, roi_contribution_layout
from pydeform.backends import cupy_kernels
from pydeform.backends.cupy_kernels import centernet, contributions, deform_conv, deform_pool, levelset, roi, semiconv
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

# Maxwell (52) and Pascal (60) as well: below compute_60 there is no double atomicAdd, and
# common.cuh, which every .cu file includes, must still compile there.
ARCHS = (52, 60, 70, 80, 90)
# NVRTC's notice for the architectures before compute_75, which CUDA 12 still supports.
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
    if arch not in nvrtc.supported_archs():
        pytest.skip(f"NVRTC {nvrtc.nvrtc_version()} does not target compute_{arch}")
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
        deform_conv.col2im_count_launch(empty, mask, empty, g),
        deform_conv.col2im_fill_launch(empty, mask, empty, empty, empty, empty, g),
        contributions.sort_launch(empty, empty, empty, empty),
        deform_conv.col2im_gather_launch(empty, empty, empty, empty, empty, g),
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
        deform_pool.backward_input_gather_launch(a, a, a, a, opt, a, g, optional_present),
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
        *deterministic_roi_launches(a, opt, {"roi_align": align, "roi_pool": pool, "deform_roi_pool": deform,
                                             "deform_psroi_pool": psroi}),
    ]


def deterministic_roi_launches(a, opt, params):
    """The deterministic backward's kernels (lists, gather, sort, and the deform ops' partials and
    parameter sums) of every family."""
    lists = ContributionLists(a, a, a, a)
    launches = [contributions.sort_launch(a, a, a, a)]
    for family, p in params.items():
        layout = roi_contribution_layout(family, a.shape, 2, p)
        optional = (opt, opt) if family == "deform_roi_pool" else (opt,)
        arrays = roi._list_arrays(family, a, a, optional)
        launches.append(roi.backward_lists_launch(family, arrays, a, a, a, a, True, a, p, layout))
        launches.append(roi.backward_gather_launch(family, lists, a, a, a, p))
        if family.startswith("deform"):
            launches.append(roi.backward_partials_launch(family, a, a, a, optional, a, p))
            launches.append(roi.backward_params_sum_launch(family, a, (a,) * len(optional), a, p))
    return launches


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


def levelset_launches(image_shape):
    """Every level-set kernel's marshalled arguments for images [B, *S] (2-D or 3-D)."""
    u = np.empty((1,), dtype=np.uint8)
    a = np.empty(image_shape)
    gradient = np.empty((image_shape[0], len(image_shape) - 1, *image_shape[1:]))
    return [
        levelset.curvature_launch(u, u, image_shape, dilate=True),
        levelset.acwe_partials_launch(u, a, a),
        levelset.acwe_means_launch(a, a, image_shape),
        levelset.acwe_attach_launch(u, a, a, 1.0, 2.0, u),
        levelset.gac_balloon_launch(u, a, a, True, u),
        levelset.gac_attach_launch(u, gradient, u),
        levelset.chan_vese_sums_launch(a, a[..., 0] if a.ndim == 4 else a, a),
        levelset.chan_vese_step_launch(a, a[..., 0] if a.ndim == 4 else a, a, 0.1, 1.0, 1.0, 0.5, u, a, a),
        levelset.chan_vese_stats_launch(a, None, a, image_shape[:3]),
    ]


@pytest.mark.parametrize("image_shape", [(2, 5, 6), (2, 3, 5, 6)], ids=["2d", "3d"])
def test_levelset_arguments_match_kernel_parameters(image_shape):
    """As above for levelset.cu (instantiated for double, the images' type), 2-D and 3-D."""
    assert_arguments_match_kernel_parameters(levelset.KERNELS, "double", levelset_launches(image_shape))


@pytest.mark.parametrize("template", ["levelset_acwe_attach", "levelset_gac_attach"])
def test_levelset_attachments_have_no_fma(template):
    """The attachments must round every product and sum as NumPy does: no contraction into an
    FMA (which NVRTC does by default) in their PTX."""
    _, result = compile_manifest(levelset.KERNELS, "double", 80)
    lowered = result.lowered_names[name_expression(template, "double")]
    body = result.ptx[result.ptx.index(f".entry {lowered}("):]
    body = body[:body.index("\n}\n")]
    assert "mul.rn.f64" in body and "fma" not in body
def semiconv_launches(dtype):
    """Every semi-convolutional kernel's marshalled arguments (labels int64, foreground bool,
    vote counts and assigned labels int32, statistics in the accumulation type)."""
    a = np.empty((2, 3, 4, 5), dtype=dtype)
    offsets = (np.array([0.5, 0.0, 0.0]), np.array([0.0, 2.0, 0.0]))
    labels, flags, counts = np.empty((2, 4, 5), np.int64), np.empty((2, 4, 5), bool), np.empty((2, 4), np.int64)
    cells = np.empty((2, 4, 5), np.int32)
    return [
        semiconv.statistics_launch(a, labels, offsets, a, counts, a, a, True),
        semiconv.loss_grad_launch(a, labels, offsets, a, counts, a, a),
        semiconv.affinity_launch(a, a, a, offsets, a, 1),
        semiconv.affinity_grad_psi_launch(a, a, a, a, offsets, a, 0),
        semiconv.affinity_grad_centers_launch(a, a, a, a, offsets, a, a, 1),
        semiconv.seeded_launch(a, a, a, offsets, a, a, a, 1),
        semiconv.seeded_grad_launch(a, a, a, a, offsets, a, a, a, a, a, a, 0),
        semiconv.votes_launch(a, flags, offsets, cells),
        semiconv.assign_launch(a, flags, a, offsets, cells, 3.5),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_semiconv_arguments_match_kernel_parameters(dtype):
    """As above for semiconv.cu, whose coordinate factors and max_distance are in the
    accumulation type: 4 bytes for float and __half storage, 8 for double."""
    assert_arguments_match_kernel_parameters(semiconv.KERNELS, TYPE_NAMES[dtype], semiconv_launches(dtype))


def cu_constant(source, name):
    match = re.search(rf"constexpr int {name} = (\d+);", (KERNEL_DIR / source).read_text())
    assert match, f"{name} not found in {source}"
    return int(match.group(1))


def test_centernet_python_constants_match_the_cuda_source():
    """The candidate lists are sized in Python with the shared-array capacity of the tile kernel."""
    assert centernet.DECODE_TILE == cu_constant("centernet.cu", "kDecodeTile")
    # The block scan packs two counts of at most a tile into the halves of an int.
    assert centernet.DECODE_TILE < 2**15


# The shared arrays of centernet.cu with one slot per thread of a block (float slots for float).
PER_THREAD_ARRAYS = ("positive", "negative", "positives", "segment_counts")
_SHARED_ARRAY = re.compile(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\S*E\d+([a-z_]+)\[(\d+)\];")


def block_size_options(threads):
    return [option for option in COMPILE_OPTIONS if not option.startswith("-DPYDEFORM_THREADS_PER_BLOCK=")] + (
        [] if threads is None else [f"-DPYDEFORM_THREADS_PER_BLOCK={threads}"])


def compile_centernet_float(options):
    expressions = [name_expression(t, "float") for t in centernet.KERNELS.templates]
    return nvrtc.compile_source(kernel_source(centernet.KERNELS.source), centernet.KERNELS.source, 80, expressions,
                                options)


def test_the_kernels_are_compiled_with_the_launch_block_size():
    assert f"-DPYDEFORM_THREADS_PER_BLOCK={THREADS_PER_BLOCK}" in COMPILE_OPTIONS


@pytest.mark.parametrize("threads", [64, THREADS_PER_BLOCK, 1024])
def test_per_thread_shared_arrays_are_sized_by_the_block_size(threads):
    """The block size is one number: the define the launches' THREADS_PER_BLOCK is compiled in
    as sizes every shared array a block holds one slot per thread in."""
    ptx = compile_centernet_float(block_size_options(threads)).ptx
    sizes = {name: int(size) for name, size in _SHARED_ARRAY.findall(ptx)}
    assert {name: sizes.get(name) for name in PER_THREAD_ARRAYS} == dict.fromkeys(PER_THREAD_ARRAYS, 4 * threads)


@pytest.mark.parametrize("threads, message", [
    (None, "compile with -DPYDEFORM_THREADS_PER_BLOCK"),
    (0, "a CUDA block has 1 to 1024 threads"),
    (2048, "a CUDA block has 1 to 1024 threads"),
])
def test_a_missing_or_impossible_block_size_does_not_compile(threads, message):
    with pytest.raises(nvrtc.NvrtcError, match=message):
        compile_centernet_float(block_size_options(threads))


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
