"""The Python side of the CuPy RawKernel backend that runs without a GPU: source assembly,
dtype -> template mapping, launch configuration, argument conversion, lazy CuPy import."""

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from pydeform.backends.cupy_kernels import _compile

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_kernel_source_inlines_each_local_header_once():
    source = _compile.kernel_source("deform_conv.cu")
    assert '#include "' not in source
    assert "#pragma once" not in source
    assert source.count('#line 1 "common.cuh"') == 1
    assert source.count('#line 1 "bilinear.cuh"') == 1
    assert "#include <cuda_fp16.h>" in source


@pytest.mark.parametrize(
    "dtype, type_name",
    [(np.float32, "float"), (np.float64, "double"), (np.float16, "__half"),
     (ml_dtypes.bfloat16, "__nv_bfloat16")],
)
def test_template_argument(dtype, type_name):
    assert _compile.template_argument(dtype) == type_name


def test_template_argument_rejects_other_dtypes():
    with pytest.raises(TypeError, match="int32"):
        _compile.template_argument(np.int32)


@pytest.mark.parametrize(
    "n_items, blocks",
    [(1, 1), (256, 1), (257, 2), (256 * 65535, 65535), (2**40, 65535)],
)
def test_grid_blocks(n_items, blocks):
    assert _compile.THREADS_PER_BLOCK == 256
    assert _compile.grid_blocks(n_items) == blocks


def test_kernel_arguments_pass_null_pointers_as_pointer_sized_zeros():
    array = np.zeros(3)
    converted = _compile.kernel_arguments((np.int64(5), array, None, np.int32(0)))
    assert converted[0] == 5 and converted[1] is array and converted[3] == 0
    assert type(converted[2]) is np.uint64 and converted[2] == 0


def test_cupy_is_imported_only_to_launch_work():
    """Importing pydeform and the kernel sets, and a launch of zero work items, need no CuPy."""
    code = (
        "import sys\n"
        "import pydeform\n"
        "from pydeform.backends.cupy_kernels import deform_conv\n"
        "deform_conv.CupyDeformConv2dKernels()._launch('float32', 'deform_conv2d_im2col', 0, ())\n"
        "assert 'cupy' not in sys.modules, 'cupy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
