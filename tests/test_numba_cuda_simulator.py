"""The Numba CUDA kernels under Numba's CUDA simulator, in a process of their own.

``NUMBA_ENABLE_CUDASIM`` must be set before Numba is first imported, and it changes what
``numba.cuda`` is for the whole process, so each check module (``tests/numba_cuda_simulator_*checks.py``)
runs in a child pytest; its output is printed here (pytest shows it when the test fails).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = (
    "tests/numba_cuda_simulator_checks.py",
    "tests/numba_cuda_simulator_centernet_checks.py",
    "tests/numba_cuda_simulator_deform_unet_checks.py",
    "tests/numba_cuda_simulator_semiconv_checks.py",
    "tests/numba_cuda_simulator_levelset_checks.py",
)


@pytest.mark.slow
@pytest.mark.parametrize("checks", CHECKS)
def test_numba_cuda_kernels_under_the_simulator(checks):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", checks, "-q", "-p", "no:cacheprovider", "--no-header"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    print(result.stdout)
    print(result.stderr, file=sys.stderr)
    assert result.returncode == 0, f"the simulator checks failed (exit status {result.returncode}), output above"
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), f"not every check ran and passed: {summary}"
