"""Level-set segmentation: the morphological snakes (MorphACWE, MorphGAC) in 2-D and 3-D and the
Chan-Vese level set, with scikit-image's semantics (docs/levelset.md explains them in full).

This module checks every argument once, lays the level sets out as the kernels expect and runs
the iterations; the level-set kernel set of the backend (:func:`pydeform.backends.levelset_kernels`)
does the per-pixel work. Layout: a batch of B images of one shape S (B = 1 unless ``batched``);
images float64 ``[B, *S]``; level sets uint8 ``[B, *(S + 2)]`` with a zero border (the "outside
is 0" of the curvature operators and the balloon), two buffers used in turn (every step reads one
and writes the other). Kernel methods (all arrays C-contiguous on the kernel set's device):

- ``sup_inf(src, dst)``, ``inf_sup(src, dst)``: the curvature operators.
- ``acwe_means(u, image, partial, means)``: means [B, 2] = (c0, c1), deterministic; partial is a
  float64 scratch [B * rows, 4] (rows: the image's axes but the last) for per-row sums, which
  a kernel set may leave unused.
- ``acwe_attach(src, image, means, lambda1, lambda2, dst)``: the attachment step.
- ``gac_balloon(src, gimage, limit, grow, dst)``: the balloon step where gimage > limit [B].
- ``gac_attach(src, gradient, dst)``: the attachment step; gradient [B, ndim, *S] is
  np.gradient of each gimage along its image axes (computed once per run).
- Optional, used instead of ``gac_balloon`` and ``gac_attach`` when the kernel set has them:
  ``gac_plan(gimage, limit) -> plan`` once per run (limit None without a balloon; the kernel
  set takes gimage's gradient itself), then per iteration ``gac_step(src, plan, balloon, dst)``:
  the balloon (balloon 1: dilation, -1: erosion, 0: none) and the attachment in one call.
- Optional, for a run without ``iter_callback``, used when the kernel set has them:
  ``acwe_run(u, spare, image, num_iter, smoothing, phase, lambda1, lambda2)`` and
  ``gac_run(u, spare, plan, balloon, num_iter, smoothing, phase)`` (plan from ``gac_plan``):
  every iteration with its smoothing, the final level sets in u (spare: scratch).
- ``chan_vese_start(phi, image, partial, stats)``, ``chan_vese_step(phi, image, stats, mu,
  lambda1, lambda2, dt, active, new_phi, partial)``: stats [B, 3] = (c1, c2, RMS change);
  partial: a scratch [B * H, 5], as in ``acwe_means``.

The smoothing phase that scikit-image keeps in module state is the keyword ``phase`` here: a run
of ``num_iter`` iterations with ``smoothing`` steps each, started at ``phase``, ends at
``(phase + num_iter * smoothing) % 2`` (:func:`next_phase`), so a later call can continue it
exactly.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from ._arrays import array_library, check_backend, check_bool, check_finite_float, check_int, shape_of
from ._interop import dlpack_entry
from .backends import levelset_kernels

__all__ = [
    "ChanVeseResult",
    "checkerboard_level_set",
    "chan_vese",
    "disk_level_set",
    "inf_sup",
    "inverse_gaussian_gradient",
    "morphological_chan_vese",
    "morphological_geodesic_active_contour",
    "next_phase",
    "sup_inf",
]


class ChanVeseResult(NamedTuple):
    """:func:`chan_vese`'s ``extended_output``: the segmentation (bool), the final level set phi
    (float64) and the energy before each iteration (float64 [iterations]; with ``batched``, a
    tuple of one such array per image)."""

    segmentation: object
    phi: object
    energies: object


def next_phase(phase: int, num_iter: int, smoothing: int) -> int:
    """The smoothing phase after a snake run: pass it as ``phase`` to continue the run exactly."""
    return (phase + num_iter * smoothing) % 2


# --- level-set initialisers (NumPy, int8, as scikit-image) ---------------------------------------

def _image_shape(image_shape) -> tuple:
    shape = tuple(image_shape)
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"image_shape: expected a tuple of ints >= 0, got {image_shape!r}")
    return tuple(int(n) for n in shape)


def _along(axis, ndim):
    """The shape that lays a 1-D array along ``axis`` of an ``ndim``-d broadcast."""
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def checkerboard_level_set(image_shape, square_size=5):
    """A checkerboard of squares (cubes) of ``square_size``: 1 where an odd number of the
    coordinates ``index // square_size`` is odd; int8 NumPy array."""
    shape = _image_shape(image_shape)
    square_size = check_int("square_size", square_size, minimum=1)
    parity = np.zeros(shape, np.int8)
    for axis, n in enumerate(shape):  # one axis at a time, broadcast: no index grid
        parity ^= (np.arange(n) // square_size & 1).astype(np.int8).reshape(_along(axis, len(shape)))
    return parity


def disk_level_set(image_shape, *, center=None, radius=None):
    """1 strictly inside the disk (ball) of ``radius`` (default ``min(image_shape) * 3 / 8``)
    around ``center`` (default ``image_shape // 2``); int8 NumPy array."""
    shape = _image_shape(image_shape)
    if center is None:
        center = tuple(n // 2 for n in shape)
    if len(center) != len(shape):
        raise ValueError(f"center: expected {len(shape)} coordinates, got {center!r}")
    if radius is None:
        radius = min(shape) * 3.0 / 8.0
    squared = 0
    for axis, (n, c) in enumerate(zip(shape, center)):  # the axes' squares added in axis order
        squared = squared + ((np.arange(n) - c) ** 2).reshape(_along(axis, len(shape)))
    return np.int8(radius - np.sqrt(np.broadcast_to(squared, shape)) > 0)


# --- argument checks, shared by every op ---------------------------------------------------------

def _real_array(name, value):
    library = array_library(name, value)
    if np.dtype(value.dtype).kind not in "biuf":
        raise TypeError(f"{name}: expected a real (bool, integer or floating) dtype, got {np.dtype(value.dtype).name}")
    return library


def _batch_view(name, value, ndims, batched):
    """``value`` with a leading batch axis; ``ndims`` the image ranks allowed."""
    ranks = tuple(n + 1 for n in ndims) if batched else ndims
    if value.ndim not in ranks:
        words = " or ".join(f"{n}-d" for n in ranks)
        extra = " (batched: [B, *image shape])" if batched else ""
        raise ValueError(f"{name}: expected a {words} array{extra}, got {value.ndim}-d with shape {shape_of(value)}")
    return value if batched else value[None]


def _kernels_for(library, backend):
    """The level-set kernel set: Numba CPU for NumPy arrays; CuPy RawKernels (default) or Numba
    CUDA (``backend="numba"``) for CuPy arrays."""
    kind = check_backend(backend, library)
    return levelset_kernels(library, kind)


def _check_gradient_shape(name, shape):
    """np.gradient (the attachment) needs 2 elements on every axis; scikit-image raises then too."""
    if min(shape) < 2:
        raise ValueError(f"{name}: every image axis needs at least 2 elements for the gradient, got shape {shape}")


def _initial(init_level_set, images, library, xp, initialisers, *, binary):
    """The initial level set [B, *S] (``binary``: uint8 ``> 0``; else float64)."""
    shape = shape_of(images)[1:]
    if isinstance(init_level_set, str):
        if init_level_set not in initialisers:
            names = ", ".join(repr(k) for k in initialisers)
            raise ValueError(f"init_level_set: expected {names} or an array, got {init_level_set!r}")
        init = xp.asarray(initialisers[init_level_set](shape))
    else:
        if array_library("init_level_set", init_level_set) != library:
            raise TypeError(f"init_level_set: expected a {library} array like the image, got "
                            f"{type(init_level_set).__module__}.{type(init_level_set).__qualname__}")
        init = init_level_set
        if np.dtype(init.dtype).kind not in "biuf":
            raise TypeError(f"init_level_set: expected a real dtype, got {np.dtype(init.dtype).name}")
        if shape_of(init) not in (shape, shape_of(images)):
            raise ValueError(f"init_level_set: expected shape {shape} (or {shape_of(images)} for a batch), got "
                             f"{shape_of(init)}; the level set has the image's dimensions")
    init = xp.broadcast_to(init, shape_of(images))
    return (init > 0).astype(np.uint8) if binary else init.astype(np.float64)


def _padded(xp, u):
    """Two zero-bordered uint8 buffers [B, *(S + 2)], the first holding u."""
    shape = (u.shape[0],) + tuple(n + 2 for n in u.shape[1:])
    first, second = xp.zeros(shape, np.uint8), xp.zeros(shape, np.uint8)
    first[(slice(None),) + (slice(1, -1),) * (u.ndim - 1)] = u
    return first, second


def _interior(u, batched):
    """The int8 level set [B, *S] (or [*S]) inside a padded buffer (a fresh array)."""
    inside = u[(slice(None),) + (slice(1, -1),) * (u.ndim - 1)].astype(np.int8)
    return inside if batched else inside[0]


class _Snake:
    """The checked arguments and buffers of a morphological snake run."""

    def __init__(self, name, image, num_iter, init_level_set, smoothing, phase, iter_callback, batched, backend):
        batched = check_bool("batched", batched)
        library = _real_array(name, image)
        images = _batch_view(name, image, (2, 3), batched)
        self.kernels = _kernels_for(library, backend)
        self.xp = xp = self.kernels.xp
        self.num_iter = check_int("num_iter", num_iter, minimum=0)
        self.smoothing = check_int("smoothing", smoothing, minimum=0)
        self.phase = check_int("phase", phase, minimum=0)
        if self.phase > 1:
            raise ValueError(f"phase: expected 0 (SI(IS(u)) first) or 1 (IS(SI(u)) first), got {phase!r}")
        if iter_callback is not None and not callable(iter_callback):
            raise TypeError(f"iter_callback: expected a callable or None, got {iter_callback!r}")
        self.callback = iter_callback
        self.batched = batched
        self.images = xp.ascontiguousarray(images, dtype=np.float64)
        initial = _initial(init_level_set, self.images, library, xp,
                           {"checkerboard": checkerboard_level_set, "disk": disk_level_set}, binary=True)
        self.u, self.spare = _padded(xp, initial)

    def report(self):
        if self.callback is not None:
            self.callback(_interior(self.u, self.batched))

    def swap(self):
        self.u, self.spare = self.spare, self.u

    def smooth(self):
        """``smoothing`` curvature steps, alternating from the current phase."""
        kernels = self.kernels
        for _ in range(self.smoothing):
            inner, outer = (kernels.inf_sup, kernels.sup_inf) if self.phase == 0 else \
                (kernels.sup_inf, kernels.inf_sup)
            inner(self.u, self.spare)
            outer(self.spare, self.u)
            self.phase = 1 - self.phase

    def result(self):
        return _interior(self.u, self.batched)


@dlpack_entry
def morphological_chan_vese(image, num_iter, init_level_set="checkerboard", smoothing=1, lambda1=1, lambda2=1,
                            iter_callback=None, *, phase=0, batched=False, backend=None):
    """Morphological active contours without edges (MorphACWE), scikit-image's
    ``morphological_chan_vese`` with an explicit smoothing ``phase`` (docs/levelset.md).

    Each iteration moves the level set u towards the pixels closer to the mean inside (c1) than
    outside (c0), where u has a gradient, then applies ``smoothing`` curvature steps.

    Args:
        image ([H, W] or [D, H, W]; [B, ...] with ``batched``): real dtype, read as float64
            (integer-valued images give exactly scikit-image's level sets).
        num_iter (int): iterations (>= 0).
        init_level_set: "checkerboard", "disk" or an array of the image's shape (binarised > 0);
            with ``batched`` also one shared by every image.
        smoothing (int): curvature steps per iteration (>= 0).
        lambda1, lambda2 (float): weights of the inside and outside terms.
        iter_callback: called with the int8 level set before the first iteration and after each
            (``num_iter + 1`` calls); the array is a copy.
        phase (int): 0 to start the smoothing with SI(IS(u)), 1 with IS(SI(u)) (keyword-only);
            see :func:`next_phase`.
        batched (bool): axis 0 is a batch of independent images (own means each).
        backend: None, "cupy" or "numba": NumPy arrays run on the Numba CPU kernels, CuPy arrays
            on CuPy RawKernels (None, "cupy") or Numba CUDA ("numba"), with no read back to the
            host inside the iteration loop (but for ``iter_callback``'s copies).

    Returns:
        int8 array of the image's shape, the final level set (values 0 and 1).
    """
    run = _Snake("image", image, num_iter, init_level_set, smoothing, phase, iter_callback, batched, backend)
    lambda1 = check_finite_float("lambda1", lambda1)
    lambda2 = check_finite_float("lambda2", lambda2)
    xp, images = run.xp, run.images
    if run.num_iter:
        _check_gradient_shape("image", shape_of(images)[1:])
    if run.callback is None and hasattr(run.kernels, "acwe_run"):
        run.kernels.acwe_run(run.u, run.spare, images, run.num_iter, run.smoothing, run.phase, lambda1, lambda2)
        return run.result()
    partial = xp.empty((int(np.prod(images.shape[:-1])), 4))
    means = xp.empty((images.shape[0], 2))
    run.report()
    for _ in range(run.num_iter):
        run.kernels.acwe_means(run.u, images, partial, means)
        run.kernels.acwe_attach(run.u, images, means, lambda1, lambda2, run.spare)
        run.swap()
        run.smooth()
        run.report()
    return run.result()


@dlpack_entry
def morphological_geodesic_active_contour(gimage, num_iter, init_level_set="disk", smoothing=1, threshold="auto",
                                          balloon=0, iter_callback=None, *, phase=0, batched=False, backend=None):
    """Morphological geodesic active contours (MorphGAC), scikit-image's
    ``morphological_geodesic_active_contour`` with an explicit smoothing ``phase``
    (docs/levelset.md).

    Each iteration applies the balloon (a 3x3(x3) dilation for ``balloon > 0``, erosion for
    ``balloon < 0``) where ``gimage > threshold / |balloon|``, moves u along the gradient of
    ``gimage``, then applies ``smoothing`` curvature steps.

    Args:
        gimage ([H, W] or [D, H, W]; [B, ...] with ``batched``): the edge-stopping image (small on
            edges, e.g. :func:`inverse_gaussian_gradient`), real dtype read as float64.
        num_iter, init_level_set, smoothing, iter_callback, phase, batched, backend: as
            :func:`morphological_chan_vese` (default init_level_set "disk").
        threshold: "auto" (NumPy's linear 40th percentile of each image) or a number.
        balloon (float): balloon force; 0 disables it.

    Returns:
        int8 array of gimage's shape, the final level set (values 0 and 1).
    """
    run = _Snake("gimage", gimage, num_iter, init_level_set, smoothing, phase, iter_callback, batched, backend)
    xp, images = run.xp, run.images
    balloon = check_finite_float("balloon", balloon)
    _check_gradient_shape("gimage", shape_of(images)[1:])
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold: expected 'auto' or a number, got {threshold!r}")
        thresholds = _percentile_40(xp, images)
    else:
        thresholds = xp.full(images.shape[0], check_finite_float("threshold", threshold))
    limit = xp.ascontiguousarray(thresholds / abs(balloon)) if balloon else None
    planned = run.num_iter and hasattr(run.kernels, "gac_plan")
    plan = run.kernels.gac_plan(images, limit) if planned else None
    # else gimage's gradient once per run, as scikit-image computes it: [B, ndim, *S]
    axes = tuple(range(1, images.ndim))
    gradient = xp.stack(xp.gradient(images, axis=axes), axis=1) if run.num_iter and not planned else None
    if plan is not None and run.callback is None and hasattr(run.kernels, "gac_run"):
        run.kernels.gac_run(run.u, run.spare, plan, int(np.sign(balloon)), run.num_iter, run.smoothing, run.phase)
        return run.result()
    run.report()
    for _ in range(run.num_iter):
        if plan is not None:
            run.kernels.gac_step(run.u, plan, int(np.sign(balloon)), run.spare)
        else:
            if balloon:
                run.kernels.gac_balloon(run.u, images, limit, balloon > 0, run.spare)
                run.swap()
            run.kernels.gac_attach(run.u, gradient, run.spare)
        run.swap()
        run.smooth()
        run.report()
    return run.result()


def _percentile_40(xp, images):
    """NumPy's linear 40th percentile of each image [B, *S] (at least 2 pixels), its
    interpolation written out as array operations so that CuPy rounds it as NumPy does
    (cupy.percentile may fuse it into an FMA, and a threshold an ulp off can move a pixel in or
    out of the balloon's mask)."""
    n = int(np.prod(images.shape[1:]))
    flat = images.reshape(images.shape[0], n)  # not -1: an empty batch has no size to infer it
    index = (n - 1) * 0.4  # NumPy's virtual index for q = 40 / 100, method "linear"
    below = int(np.floor(index))
    fraction = index - below
    # a NaN goes last in both; CuPy documents that for its sort, not for its partition
    ordered = np.partition(flat, sorted({below, below + 1, n - 1}), axis=1) if xp is np else xp.sort(flat, axis=1)
    low, high = ordered[:, below], ordered[:, below + 1]
    difference = high - low
    value = high - difference * (1 - fraction) if fraction >= 0.5 else low + difference * fraction
    return xp.where(xp.isnan(ordered[:, -1]), np.nan, value)


def _curvature(u, name, backend):
    library = _real_array("u", u)
    if u.ndim not in (2, 3):
        raise ValueError(f"u: expected a 2-d or 3-d level set, got {u.ndim}-d with shape {shape_of(u)}")
    kernels = _kernels_for(library, backend)
    # non-zero is 1, NaN and negative values included: scikit-image's SciPy binary morphology
    src, dst = _padded(kernels.xp, (u[None] != 0).astype(np.uint8))
    getattr(kernels, name)(src, dst)
    return _interior(dst, False)


@dlpack_entry
def sup_inf(u, *, backend=None):
    """The SI curvature operator: the largest erosion of ``u`` (every non-zero element, as in
    scikit-image, is 1) by the line elements through the centre (2-D: 4 segments of 3 pixels;
    3-D: 9 planes of 3x3 voxels), outside the array 0.
    u: [H, W] or [D, H, W]; returns int8 of u's shape. backend: as :func:`morphological_chan_vese`."""
    return _curvature(u, "sup_inf", backend)


@dlpack_entry
def inf_sup(u, *, backend=None):
    """The IS curvature operator: the smallest dilation of ``u`` (every non-zero element is 1) by
    the line elements through the centre, outside the array 0 (so IS(u) differs from
    1 - SI(1 - u) on the border).
    u: [H, W] or [D, H, W]; returns int8 of u's shape. backend: as :func:`morphological_chan_vese`."""
    return _curvature(u, "inf_sup", backend)


@dlpack_entry
def inverse_gaussian_gradient(image, alpha=100.0, sigma=5.0):
    """``1 / sqrt(1 + alpha * |grad (G_sigma * image)|)``: close to 1 in flat areas and to 0 on
    edges, the usual ``gimage`` of :func:`morphological_geodesic_active_contour`. The Gaussian
    gradient magnitude is SciPy's (cupyx.scipy's for CuPy arrays), mode "nearest"; float64."""
    library = _real_array("image", image)
    alpha = check_finite_float("alpha", alpha)
    sigma = check_finite_float("sigma", sigma)
    if library == "numpy":
        from scipy import ndimage
        xp = np
    else:
        import cupy as xp
        from cupyx.scipy import ndimage
    magnitude = ndimage.gaussian_gradient_magnitude(xp.asarray(image, dtype=np.float64), sigma, mode="nearest")
    return 1.0 / xp.sqrt(1.0 + alpha * magnitude)


# --- Chan-Vese ------------------------------------------------------------------------------------

def _chan_vese_checkerboard(shape):
    y = np.arange(shape[0], dtype=np.float64).reshape(shape[0], 1) * (np.pi / 5)
    x = np.arange(shape[1], dtype=np.float64) * (np.pi / 5)
    return np.sin(y) * np.sin(x)


def _chan_vese_disk(shape, scale):
    """(r - distance to the centre pixel) / (r * scale), r = the smaller half-size / scale."""
    centre = ((shape[0] - 1) // 2, (shape[1] - 1) // 2)
    radius = float(min(centre[1], centre[0]))
    if scale == 1:
        return (radius - _distance(shape, centre)) / radius
    radius /= 2.0
    return (radius - _distance(shape, centre)) / (radius * 3)


def _distance(shape, centre):
    yy, xx = np.indices(shape)
    return np.sqrt((yy - centre[0]) ** 2.0 + (xx - centre[1]) ** 2.0)


_CHAN_VESE_INIT = {
    "checkerboard": _chan_vese_checkerboard,
    "disk": lambda shape: _chan_vese_disk(shape, 1),
    "small disk": lambda shape: _chan_vese_disk(shape, 2),
}


def _chan_vese_energy(xp, image, phi, mu, lambda1, lambda2):
    """The energy of each image [B]: the region terms weighted by the smoothed Heaviside plus mu
    times the smoothed contour length (host-side array expressions; only for extended_output)."""
    axes = (1, 2)
    H = 0.5 * (1.0 + (2.0 / np.pi) * xp.arctan(phi))
    inside, outside = H.sum(axes), (1.0 - H).sum(axes)
    c1 = xp.where(inside != 0, (image * H).sum(axes) / xp.where(inside != 0, inside, 1), 0)[:, None, None]
    c2 = xp.where(outside != 0, (image * (1.0 - H)).sum(axes) / xp.where(outside != 0, outside, 1), 0)[:, None, None]
    region = lambda1 * (image - c1) ** 2 * H + lambda2 * (image - c2) ** 2 * (1.0 - H)
    P = xp.pad(phi, ((0, 0), (1, 1), (1, 1)), mode="edge")
    fy = (P[:, 2:, 1:-1] - P[:, :-2, 1:-1]) / 2.0
    fx = (P[:, 1:-1, 2:] - P[:, 1:-1, :-2]) / 2.0
    length = mu * (1.0 / (1.0 + phi ** 2)) * xp.sqrt(fx ** 2 + fy ** 2)
    return region.sum(axes) + length.sum(axes)


@dlpack_entry
def chan_vese(image, mu=0.25, lambda1=1.0, lambda2=1.0, tol=1e-3, max_num_iter=500, dt=0.5,
              init_level_set="checkerboard", extended_output=False, *, batched=False, backend=None):
    """The Chan-Vese level set, scikit-image's ``chan_vese`` (docs/levelset.md), computed in
    float64.

    The image is normalised to [0, 1]; each iteration is one Jacobi step of the level set phi
    (semi-implicit in the curvature term); the run stops when the RMS change of phi is <= tol or
    after max_num_iter iterations. That stopping test reads one number per image back to the
    host each iteration.

    Args:
        image ([H, W]; [B, H, W] with ``batched``): real dtype.
        mu, lambda1, lambda2, dt, tol (float): the weights, time step and tolerance.
        max_num_iter (int): the iteration limit (>= 0).
        init_level_set: "checkerboard", "disk", "small disk" or an array of the image's shape.
        extended_output (bool): also return phi and the energies.
        batched (bool): axis 0 is a batch of independent images, each with its own means and
            its own stopping test.
        backend: as :func:`morphological_chan_vese`; on the GPU the stopping test is the one
            read back to the host per iteration (one float64 per image).

    Returns:
        bool segmentation ``phi > 0``; with ``extended_output`` a :class:`ChanVeseResult`.
    """
    batched = check_bool("batched", batched)
    library = _real_array("image", image)
    images = _batch_view("image", image, (2,), batched)
    kernels = _kernels_for(library, backend)
    xp = kernels.xp
    mu, lambda1, lambda2, dt, tol = (check_finite_float(name, value) for name, value in
                                     (("mu", mu), ("lambda1", lambda1), ("lambda2", lambda2), ("dt", dt), ("tol", tol)))
    max_num_iter = check_int("max_num_iter", max_num_iter, minimum=0)
    extended_output = check_bool("extended_output", extended_output)
    images = images.astype(np.float64)
    phi = xp.ascontiguousarray(_initial(init_level_set, images, library, xp, _CHAN_VESE_INIT, binary=False))
    batch = images.shape[0]
    if images.size:
        low = images.reshape(batch, -1).min(axis=1)[:, None, None]
        images = images - low
        high = images.reshape(batch, -1).max(axis=1)[:, None, None]
        images = xp.ascontiguousarray(images / xp.where(high != 0, high, 1.0))

    spare = xp.empty_like(phi)
    final = phi.copy()
    partial = xp.empty((batch * images.shape[1], 5))
    stats = xp.empty((batch, 3))
    active = np.ones(batch, dtype=np.uint8)
    active_on_device = xp.asarray(active)  # sent again only when an image stops
    energies = [[] for _ in range(batch)]
    energy = _chan_vese_energy(xp, images, phi, mu, lambda1, lambda2) if extended_output else None
    if phi.size:
        kernels.chan_vese_start(phi, images, partial, stats)
    iteration = 0
    while active.any() and iteration < max_num_iter and phi.size:
        kernels.chan_vese_step(phi, images, stats, mu, lambda1, lambda2, dt, active_on_device, spare, partial)
        phi, spare = spare, phi
        changes = xp.asnumpy(stats[:, 2]) if xp is not np else stats[:, 2].copy()
        if extended_output:
            for b in np.flatnonzero(active):
                energies[b].append(energy[b])
            energy = _chan_vese_energy(xp, images, phi, mu, lambda1, lambda2)
        iteration += 1
        # "not > tol" rather than "<= tol": a NaN change stops the run, as in scikit-image
        done = active.astype(bool) & (~(changes > tol) | (iteration == max_num_iter))
        for b in np.flatnonzero(done):
            final[b] = phi[b]
        if done.any():
            active[done] = 0
            active_on_device = xp.asarray(active)
    segmentation = final > 0 if batched else final[0] > 0
    if not extended_output:
        return segmentation
    stacked = tuple(xp.asarray(np.array([float(e) for e in per_image])) for per_image in energies)
    return ChanVeseResult(segmentation, final if batched else final[0], stacked if batched else stacked[0])
