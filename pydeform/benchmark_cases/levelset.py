"""The level-set ops' benchmark cases (docs/levelset.md), the same shapes on the GPU and the CPU:

- morphological_chan_vese 512x512, 35 iterations, smoothing 3, on an integer-valued image; 3-D
  64^3, 10 iterations; a batch of 64 images of 128x128 in one call (``batched=True``),
  35 iterations, smoothing 3;
- morphological_geodesic_active_contour 512x512, 100 iterations, balloon -1, on the inverse
  Gaussian gradient of such an image;
- chan_vese 512x512, 200 iterations (``tol=0``: every iteration runs).

The peers compute the same thing: scikit-image on the CPU and cuCIM (its GPU port) on the GPU,
both given the float64 values of pydeform's float32 inputs and their smoothing phase reset to
pydeform's ``phase=0`` before each call; the batched case's peer is pydeform's single-image call
in a loop over the batch (the batched call should be at least as fast per image).

On the GPU, :func:`launches_per_iteration` counts the kernels pydeform's CuPy backend launches
per iteration; ``python -m pydeform bench`` reports it beside the times.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .common import Calls, Case, PeerUnavailable

OPS = ("morphological_chan_vese", "morphological_geodesic_active_contour", "chan_vese")
DETERMINISTIC_OPS = ()
DTYPES = ("float32",)  # the ops compute in float64; integer-valued images are exact in float32
BATCH = 64
_SKIMAGE = "scikit-image {} (CPU)"
_CUCIM = "cuCIM {} (cucim.skimage)"
_LOOP = "pydeform {}, one call per image"
# The option giving each op's number of iterations.
ITERATIONS = {"morphological_chan_vese": "num_iter", "morphological_geodesic_active_contour": "num_iter",
              "chan_vese": "max_num_iter"}


def scene(rng, shape):
    """An integer-valued float32 image of ``shape`` (2-D or 3-D): a few bright balls on a dark
    background, with noise, values in [0, 255]."""
    grid = np.indices(shape, dtype=np.float64)
    side = min(shape)
    image = np.full(shape, 60.0)
    for _ in range(5):
        centre = rng.uniform(0.15, 0.85, len(shape)) * np.array(shape)
        radius = rng.uniform(0.08, 0.2) * side
        squared = sum((axis - c) ** 2 for axis, c in zip(grid, centre))
        image[squared < radius**2] = rng.uniform(150.0, 220.0)
    image += rng.normal(0.0, 20.0, shape)
    return np.round(np.clip(image, 0.0, 255.0)).astype(np.float32)


def _images(shape, batch=None):
    def build(seed):
        rng = np.random.default_rng(seed)
        if batch is None:
            return {"image": scene(rng, shape)}
        return {"image": np.stack([scene(rng, shape) for _ in range(batch)])}

    return build


def _gimage(shape):
    """The inverse Gaussian gradient (alpha 100, sigma 2) of a scaled scene, float32."""

    def build(seed):
        import pydeform

        image = scene(np.random.default_rng(seed), shape) / np.float32(255.0)
        return {"gimage": pydeform.inverse_gaussian_gradient(image, sigma=2.0).astype(np.float32)}

    return build


def reset_smoothing_phase(morphsnakes):
    """Start the module-level smoothing cycle of scikit-image's (or cuCIM's, a port of it whose
    operators also take the footprints and a workspace: ``rest``) ``morphsnakes`` module at
    SI(IS(u)), pydeform's ``phase=0``."""
    operators = [lambda u, *rest: morphsnakes.sup_inf(morphsnakes.inf_sup(u, *rest), *rest),
                 lambda u, *rest: morphsnakes.inf_sup(morphsnakes.sup_inf(u, *rest), *rest)]
    morphsnakes._curvop = morphsnakes._fcycle(operators)


def _library_calls(case, host, segmentation, xp, morphsnakes):
    """The Calls of ``segmentation``'s function of the case's op (scikit-image's or cuCIM's) on
    ``host``'s arrays as float64 ``xp`` arrays."""
    function = getattr(segmentation, case.op)
    arrays = {name: xp.asarray(array.astype(np.float64)) for name, array in host.items()}

    def forward():
        if morphsnakes is not None:
            reset_smoothing_phase(morphsnakes)
        return function(**arrays, **case.options)

    return Calls(forward, None)


def _skimage_calls(case, host, dtype):
    try:
        from skimage import segmentation
        from skimage.segmentation import morphsnakes
    except ImportError:
        raise PeerUnavailable("scikit-image is not installed") from None
    return _library_calls(case, host, segmentation, np, morphsnakes if case.op != "chan_vese" else None)


def _cucim_calls(case, host, dtype):
    try:
        import cupy
        from cucim.skimage import segmentation
        from cucim.skimage.segmentation import morphsnakes
    except ImportError:
        raise PeerUnavailable("cuCIM is not installed") from None
    return _library_calls(case, host, segmentation, cupy, morphsnakes if case.op != "chan_vese" else None)


def _loop_calls(case, host, dtype):
    """pydeform's single-image call over the batch, on the case's device (default backend)."""
    import pydeform

    if case.device == "gpu":
        import cupy as xp
    else:
        xp = np
    images = xp.asarray(host["image"].astype(dtype))
    function = getattr(pydeform, case.op)
    options = {name: value for name, value in case.options.items() if name != "batched"}

    def forward():
        return [function(image, **options) for image in images]

    return Calls(forward, None)


@contextlib.contextmanager
def counting_cupy_launches():
    """Within the block, every launch of one of pydeform's CuPy RawKernels appends its template
    name to the list yielded."""
    from ..backends.cupy_kernels import _compile

    original = _compile._kernel
    launches = []

    def counted(manifest, template, *key):
        kernel = original(manifest, template, *key)

        def launch(*args, **kwargs):
            launches.append(template)
            return kernel(*args, **kwargs)

        return launch

    _compile._kernel = counted
    try:
        yield launches
    finally:
        _compile._kernel = original


def launches_per_iteration(case: Case, arrays: dict, backend=None) -> int:
    """The kernels pydeform's CuPy backend launches per iteration of ``case`` on ``arrays`` (CuPy
    arrays): the launches of a run of two iterations minus those of a run of one, so that the
    set-up (initial level set, gradient, final copy) does not count. CuPy's own array
    operations in the driver are not counted (the snakes' loops make none; Chan-Vese's stopping
    test copies one number per image to the host)."""
    import pydeform

    function = getattr(pydeform, case.op)
    counts = []
    for iterations in (1, 2):
        options = dict(case.options, **{ITERATIONS[case.op]: iterations})
        with counting_cupy_launches() as launches:
            function(**arrays, **options, backend=backend)
        counts.append(len(launches))
    return counts[1] - counts[0]


def level_set_cases(device: str, side: int = 512):
    """The cases of ``device`` with 2-D images of ``side`` x ``side`` (the volume's side is
    ``side / 8``, the batch's images ``side / 4``): the standard shapes at the default, smaller
    ones for tests."""
    peer, peer_builder = (_CUCIM, _cucim_calls) if device == "gpu" else (_SKIMAGE, _skimage_calls)
    plane, volume, small = (side, side), (side // 8,) * 3, (side // 4, side // 4)
    square, cube, tile = f"{side}x{side}", "x".join([str(side // 8)] * 3), f"{side // 4}x{side // 4}"
    yield Case("morphological_chan_vese", f"{square}-35it-smoothing3", device,
               f"{square} integer image, 35 iterations, smoothing 3, checkerboard start", DTYPES, _images(plane),
               {"num_iter": 35, "smoothing": 3}, False, peer.format("morphological_chan_vese"),
               peer_builder=peer_builder, launches=launches_per_iteration)
    yield Case("morphological_chan_vese", f"{cube}-10it", device,
               f"{cube} integer volume, 10 iterations, smoothing 1, checkerboard start", DTYPES, _images(volume),
               {"num_iter": 10}, False, peer.format("morphological_chan_vese"), peer_builder=peer_builder,
               launches=launches_per_iteration)
    yield Case("morphological_chan_vese", f"batch{BATCH}-{tile}-35it-smoothing3", device,
               f"{BATCH} integer images of {tile} in one batched call, 35 iterations, smoothing 3", DTYPES,
               _images(small, BATCH), {"num_iter": 35, "smoothing": 3, "batched": True}, False,
               _LOOP.format("morphological_chan_vese"), peer_builder=_loop_calls, launches=launches_per_iteration)
    yield Case("morphological_geodesic_active_contour", f"{square}-100it-balloon-1", device,
               f"{square} inverse Gaussian gradient (sigma 2), 100 iterations, balloon -1, disk start", DTYPES,
               _gimage(plane), {"num_iter": 100, "balloon": -1}, False,
               peer.format("morphological_geodesic_active_contour"), peer_builder=peer_builder,
               launches=launches_per_iteration)
    yield Case("chan_vese", f"{square}-200it", device, f"{square} integer image, 200 iterations (tol 0)", DTYPES,
               _images(plane), {"max_num_iter": 200, "tol": 0.0}, False, peer.format("chan_vese"),
               peer_builder=peer_builder, launches=launches_per_iteration)


def standard_cases():
    for device in ("gpu", "cpu"):
        yield from level_set_cases(device)
