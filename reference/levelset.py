"""Level-set segmentation (docs/levelset.md) in float64 / integer NumPy: the morphological snakes
(MorphACWE, MorphGAC) in 2-D and 3-D and the Chan-Vese level set, scikit-image's algorithms
written out with explicit shifts instead of SciPy's morphology.

The curvature operators are built from the line elements through the centre (2-D: 4 segments of
3 pixels; 3-D: 9 planes of 3x3 voxels): ``SI(u) = max_S erode_S(u)``, ``IS(u) = min_S
dilate_S(u)``, with every pixel outside the array read as 0 for erosion and dilation alike, so
``IS(u) != 1 - SI(1 - u)`` on the border. The smoothing steps alternate ``SI(IS(.))`` (phase 0)
and ``IS(SI(.))`` (phase 1), continuing across iterations from ``phase``.
"""

import math

import numpy as np

# Offsets (one per axis) of the 3 elements of each 2-D line and of the 9 of each 3-D plane.
_T = (-1, 0, 1)
LINES_2D = (
    tuple((t, t) for t in _T),
    tuple((t, 0) for t in _T),
    tuple((t, -t) for t in _T),
    tuple((0, t) for t in _T),
)
PLANES_3D = (
    tuple((a, b, 0) for a in _T for b in _T),
    tuple((a, 0, b) for a in _T for b in _T),
    tuple((0, a, b) for a in _T for b in _T),
    tuple((a, b, b) for a in _T for b in _T),
    tuple((a, b, -b) for a in _T for b in _T),
    tuple((b, a, b) for a in _T for b in _T),
    tuple((b, a, -b) for a in _T for b in _T),
    tuple((b, b, a) for a in _T for b in _T),
    tuple((b, -b, a) for a in _T for b in _T),
)


def _shifted(u, offset):
    """``v[p] = u[p + offset]``, 0 where ``p + offset`` is outside the array."""
    padded = np.pad(u, 1)
    return padded[tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, u.shape))]


def _elements(u):
    if u.ndim == 2:
        return LINES_2D
    if u.ndim == 3:
        return PLANES_3D
    raise ValueError(f"u: expected a 2-d or 3-d level set, got {u.ndim}-d")


def sup_inf(u):
    """SI: the largest of the erosions of ``u`` (read as ``u != 0``, as SciPy's binary erosion
    does) by the line elements; int8."""
    binary = (np.asarray(u) != 0).astype(np.int8)
    erosions = [np.minimum.reduce([_shifted(binary, o) for o in element]) for element in _elements(binary)]
    return np.maximum.reduce(erosions).astype(np.int8)


def inf_sup(u):
    """IS: the smallest of the dilations of ``u`` (read as ``u != 0``, as SciPy's binary dilation
    does) by the line elements; int8."""
    binary = (np.asarray(u) != 0).astype(np.int8)
    dilations = [np.maximum.reduce([_shifted(binary, o) for o in element]) for element in _elements(binary)]
    return np.minimum.reduce(dilations).astype(np.int8)


def smooth(u, smoothing, phase):
    """``smoothing`` curvature steps from ``phase``: ``(u, phase after them)``."""
    for _ in range(smoothing):
        u = sup_inf(inf_sup(u)) if phase == 0 else inf_sup(sup_inf(u))
        phase = 1 - phase
    return u, phase


def _box(u, combine):
    """Erosion (``np.minimum``) or dilation (``np.maximum``) by the full 3x3(x3) box, outside 0."""
    offsets = np.ndindex(*(3,) * u.ndim)
    return combine.reduce([_shifted(u, tuple(o - 1 for o in offset)) for offset in offsets])


def gradient(f):
    """``np.gradient``'s rule per axis, in float64: central differences ``(f[i+1] - f[i-1]) / 2``
    inside, one-sided ``f[1] - f[0]`` and ``f[n-1] - f[n-2]`` at the ends (every axis >= 2)."""
    f = np.asarray(f, dtype=np.float64)
    out = []
    for axis, n in enumerate(f.shape):
        if n < 2:
            raise ValueError(f"every axis needs at least 2 elements for a gradient, got shape {f.shape}")
        g = np.empty_like(f)
        f_ = np.moveaxis(f, axis, 0)
        g_ = np.moveaxis(g, axis, 0)
        g_[1:-1] = (f_[2:] - f_[:-2]) / 2.0
        g_[0] = (f_[1] - f_[0]) / 1.0
        g_[-1] = (f_[-1] - f_[-2]) / 1.0
        out.append(g)
    return out


def has_gradient(u):
    """Where some axis of ``gradient(u)`` is non-zero (u[i+1] != u[i-1] inside, one-sided ends)."""
    result = np.zeros(u.shape, dtype=bool)
    for axis, n in enumerate(u.shape):
        if n < 2:
            raise ValueError(f"every axis needs at least 2 elements for a gradient, got shape {u.shape}")
        idx = np.arange(n)
        right = np.take(u, np.minimum(idx + 1, n - 1), axis=axis)
        left = np.take(u, np.maximum(idx - 1, 0), axis=axis)
        result |= right != left
    return result


def checkerboard_level_set(image_shape, square_size=5):
    """1 where the number of odd ``index // square_size`` over the axes is odd; int8."""
    grid = np.indices(image_shape) // square_size
    return (np.sum(grid & 1, axis=0) & 1).astype(np.int8)


def disk_level_set(image_shape, *, center=None, radius=None):
    """1 strictly inside the ball of ``radius`` (default ``min(shape) * 3 / 8``) around ``center``
    (default ``shape // 2``); int8."""
    if center is None:
        center = tuple(n // 2 for n in image_shape)
    if radius is None:
        radius = min(image_shape) * 3.0 / 8.0
    grid = np.indices(image_shape).astype(np.float64)
    squared = sum((g - c) ** 2 for g, c in zip(grid, center))
    return (radius - np.sqrt(squared) > 0).astype(np.int8)


def initial_level_set(init_level_set, shape):
    if isinstance(init_level_set, str):
        if init_level_set == "checkerboard":
            return checkerboard_level_set(shape)
        if init_level_set == "disk":
            return disk_level_set(shape)
        raise ValueError(f"init_level_set: expected 'checkerboard', 'disk' or an array, got {init_level_set!r}")
    init = np.asarray(init_level_set)
    if init.shape != tuple(shape):
        raise ValueError(f"init_level_set: expected shape {tuple(shape)}, got {init.shape}")
    return (init > 0).astype(np.int8)


def morphological_chan_vese(image, num_iter, init_level_set="checkerboard", smoothing=1, lambda1=1, lambda2=1,
                            iter_callback=None, phase=0):
    """MorphACWE; returns ``(u int8, final phase)``. ``image`` is read as float64 (integer values
    stay exact, so the means equal scikit-image's)."""
    image = np.asarray(image, dtype=np.float64)
    u = initial_level_set(init_level_set, image.shape)
    if iter_callback is not None:
        iter_callback(u.copy())
    for _ in range(num_iter):
        outside = 1 - u
        c0 = np.sum(image * outside) / (float(np.sum(outside)) + 1e-8)
        c1 = np.sum(image * u) / (float(np.sum(u)) + 1e-8)
        grad = has_gradient(u)
        aux = lambda1 * (image - c1) ** 2 - lambda2 * (image - c0) ** 2
        # has_grad * aux: 0 (no change) where the gradient is 0 unless aux is infinite or NaN
        aux = np.where(grad, aux, 0.0 * aux)
        u = np.where(aux < 0, 1, np.where(aux > 0, 0, u)).astype(np.int8)
        u, phase = smooth(u, smoothing, phase)
        if iter_callback is not None:
            iter_callback(u.copy())
    return u, phase


def morphological_geodesic_active_contour(gimage, num_iter, init_level_set="disk", smoothing=1, threshold="auto",
                                          balloon=0, iter_callback=None, phase=0):
    """MorphGAC; returns ``(u int8, final phase)``."""
    gimage = np.asarray(gimage, dtype=np.float64)
    u = initial_level_set(init_level_set, gimage.shape)
    if isinstance(threshold, str):
        threshold = np.percentile(gimage, 40)
    dg = gradient(gimage)
    mask = gimage > threshold / abs(balloon) if balloon != 0 else None
    if iter_callback is not None:
        iter_callback(u.copy())
    for _ in range(num_iter):
        if balloon != 0:
            moved = _box(u, np.maximum if balloon > 0 else np.minimum)
            u = np.where(mask, moved, u)
        du = gradient(u)
        aux = dg[0] * du[0]
        for d, g in zip(dg[1:], du[1:]):
            aux = aux + d * g
        u = np.where(aux > 0, 1, np.where(aux < 0, 0, u)).astype(np.int8)
        u, phase = smooth(u, smoothing, phase)
        if iter_callback is not None:
            iter_callback(u.copy())
    return u, phase


def inverse_gaussian_gradient(image, alpha=100.0, sigma=5.0):
    """``1 / sqrt(1 + alpha * |grad G_sigma * image|)`` (SciPy's Gaussian gradient magnitude,
    mode "nearest")."""
    from scipy import ndimage

    magnitude = ndimage.gaussian_gradient_magnitude(np.asarray(image, dtype=np.float64), sigma, mode="nearest")
    return 1.0 / np.sqrt(1.0 + alpha * magnitude)


# --- Chan-Vese -----------------------------------------------------------------------------------

def _edge_padded_differences(phi):
    P = np.pad(phi, 1, mode="edge")
    centre = P[1:-1, 1:-1]
    right, left, down, up = P[1:-1, 2:], P[1:-1, :-2], P[2:, 1:-1], P[:-2, 1:-1]
    return centre, right, left, down, up


def _means(image, weight):
    """The means of image weighted by ``weight`` and by ``1 - weight`` (0 for a zero weight sum)."""
    inside, outside = np.sum(weight), np.sum(1.0 - weight)
    c1 = np.sum(image * weight) / inside if inside != 0 else 0.0
    c2 = np.sum(image * (1.0 - weight)) / outside if outside != 0 else 0.0
    return c1, c2


def chan_vese_step(image, phi, mu, lambda1, lambda2, dt):
    """One Jacobi update of the Chan-Vese level set (semi-implicit in the curvature term)."""
    eta = 1e-16
    centre, right, left, down, up = _edge_padded_differences(phi)
    dx_fwd, dx_bwd, dx_mid = right - centre, centre - left, (right - left) / 2.0
    dy_fwd, dy_bwd, dy_mid = down - centre, centre - up, (down - up) / 2.0
    C1 = 1.0 / np.sqrt(eta + dx_fwd ** 2 + dy_mid ** 2)
    C2 = 1.0 / np.sqrt(eta + dx_bwd ** 2 + dy_mid ** 2)
    C3 = 1.0 / np.sqrt(eta + dx_mid ** 2 + dy_fwd ** 2)
    C4 = 1.0 / np.sqrt(eta + dx_mid ** 2 + dy_bwd ** 2)
    K = right * C1 + left * C2 + down * C3 + up * C4
    c1, c2 = _means(image, (phi > 0).astype(np.float64))
    delta = 1.0 / (1.0 + phi ** 2)
    force = -lambda1 * (image - c1) ** 2 + lambda2 * (image - c2) ** 2
    return (phi + dt * delta * (mu * K + force)) / (1.0 + mu * dt * delta * (C1 + C2 + C3 + C4))


def chan_vese_energy(image, phi, mu, lambda1, lambda2):
    """Region terms weighted by the smoothed Heaviside plus mu times the smoothed contour length."""
    H = 0.5 * (1.0 + (2.0 / np.pi) * np.arctan(phi))
    c1, c2 = _means(image, H)
    region = lambda1 * (image - c1) ** 2 * H + lambda2 * (image - c2) ** 2 * (1.0 - H)
    _, right, left, down, up = _edge_padded_differences(phi)
    length = mu * (1.0 / (1.0 + phi ** 2)) * np.sqrt(((right - left) / 2.0) ** 2 + ((down - up) / 2.0) ** 2)
    return np.sum(region) + np.sum(length)


def chan_vese_initial(init_level_set, shape):
    """The float64 initial level set of chan_vese: "checkerboard" (sin(pi y / 5) sin(pi x / 5)),
    "disk" / "small disk" (scaled signed distance to the centre pixel), or an array."""
    if not isinstance(init_level_set, str):
        init = np.asarray(init_level_set, dtype=np.float64)
        if init.shape != tuple(shape):
            raise ValueError(f"init_level_set: expected shape {tuple(shape)}, got {init.shape}")
        return init
    if init_level_set == "checkerboard":
        y = np.arange(shape[0], dtype=np.float64)[:, None] * (math.pi / 5)
        x = np.arange(shape[1], dtype=np.float64)[None, :] * (math.pi / 5)
        return np.sin(y) * np.sin(x)
    if init_level_set in ("disk", "small disk"):
        cy, cx = (shape[0] - 1) // 2, (shape[1] - 1) // 2
        yy, xx = np.indices(shape)
        distance = np.sqrt((yy - cy) ** 2.0 + (xx - cx) ** 2.0)
        radius = float(min(cx, cy))
        if init_level_set == "disk":
            return (radius - distance) / radius
        return (radius / 2.0 - distance) / (radius / 2.0 * 3)
    raise ValueError(f"init_level_set: expected 'checkerboard', 'disk', 'small disk' or an array, got "
                     f"{init_level_set!r}")


def chan_vese(image, mu=0.25, lambda1=1.0, lambda2=1.0, tol=1e-3, max_num_iter=500, dt=0.5,
              init_level_set="checkerboard", extended_output=False):
    """Chan-Vese segmentation of a 2-d image (normalised to [0, 1]); returns the segmentation
    ``phi > 0``, with ``extended_output`` also phi and the energy before each iteration."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2-d array, got {image.ndim}-d")
    phi = chan_vese_initial(init_level_set, image.shape)
    image = image - np.min(image)
    if np.max(image) != 0:
        image = image / np.max(image)
    energies = []
    energy = chan_vese_energy(image, phi, mu, lambda1, lambda2) if extended_output else None
    change = tol + 1
    i = 0
    while change > tol and i < max_num_iter:
        old = phi
        phi = chan_vese_step(image, phi, mu, lambda1, lambda2, dt)
        change = np.sqrt(np.mean((phi - old) ** 2))
        if extended_output:
            energies.append(energy)
            energy = chan_vese_energy(image, phi, mu, lambda1, lambda2)
        i += 1
    segmentation = phi > 0
    if extended_output:
        return segmentation, phi, energies
    return segmentation
