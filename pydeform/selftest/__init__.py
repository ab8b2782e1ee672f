"""``python -m pydeform selftest``: check every op on every backend this machine can run.

The checks need nothing but pydeform and NumPy (the test suite's float64 reference is not
installed): agreement with a float64 run of the same backend, agreement of the GPU backends with
the Numba CPU backend in float64, finite-difference gradients, and special cases whose answer
NumPy computes directly: zero offsets and a unit mask give an ordinary convolution; RoI Align of
an affine image is the affine function at the bin centres (bilinear interpolation is exact on
it); RoI Pool of a ramp is the last pixel of each bin; position-sensitive pooling of a
channel-constant input returns each bin's channel; deformable RoI pooling with zero offsets is
aligned RoI Align, and its mask multiplies the output; CenterNet's decode of planted peaks
returns them in order with their boxes, its targets of hand-worked boxes fill the slots and put
1 at the centres, and its focal loss equals the formula; the transposed deformable convolution
with zero offsets is a transposed convolution and the adjoint of deform_conv2d, deformable
pooling with zero offsets is pooling of the zero-padded input and its avg mode a depthwise
deform_conv2d; the semi-convolutional ops' means, loss, affinities and seeded logits equal their
NumPy formulas, the votes ``np.add.at`` of the rounded positions, the assignment a brute-force
argmin, and the loss and its gradient are bit-identical run to run; the level-set ops reproduce
scikit-image's own test cases, the curvature operators their direct NumPy formulation, and a
snake continued at ``next_phase`` one run.

One module per op family registers that family's checks with the :func:`check` decorator when
imported (``deform_conv``, ``roi``, ``centernet``, ``deform_unet``, ``semiconv``,
``levelset``); :mod:`.common`
holds the backends, the registry, the checks every op gets and the runner, which crosses every
registered check with every available backend and dtype it applies to and prints one table row
per run. A new family
adds a module and imports it below.
"""

from .common import (
    CHECKS, NUMBA_CPU, Backend, Check, OpCalls, below_float64, check, discover_backends, every_run, float64_only,
    gpu_only, run_selftest,
)

# Importing a family registers its checks; the table lists the ops in this order.
from . import deform_conv, roi, centernet, deform_unet, semiconv, levelset  # noqa: F401

__all__ = [
    "CHECKS",
    "NUMBA_CPU",
    "Backend",
    "Check",
    "OpCalls",
    "below_float64",
    "check",
    "discover_backends",
    "every_run",
    "float64_only",
    "gpu_only",
    "run_selftest",
]
