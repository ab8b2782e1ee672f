"""Level-set kernels for the Numba CPU target: morphological snakes and Chan-Vese.

Layouts (docs/levelset.md): a batch of B images of one shape S (2-D ``[H, W]`` or 3-D
``[D, H, W]``); images float64 ``[B, *S]``; level sets uint8 ``[B, *(S + 2)]`` with a border of
zeros one pixel wide that no kernel writes, so erosion and dilation read 0 outside the image with
no bounds test. Every step is Jacobi: a kernel reads one level-set buffer and writes the other.

A task is one row (a fixed ``b``, and ``z`` in 3-D, ``y``) walked along x; tasks run in order on
one thread. Reductions are deterministic: each task writes its row's partial sums (kept in 4
interleaved lanes along the row, added in lane order), and one pass per image adds the rows in
order. Arithmetic is IEEE float64 without contraction into FMAs, so the MorphACWE attachment
equals NumPy's for integer-valued images and the MorphGAC attachment for any float64 gimage.
"""

from __future__ import annotations

import functools

import numpy as np

from .disk_cache import cache_on_disk


def cpu_serial_kernel(fn):
    """Compile a kernel for one CPU thread (its ``prange`` runs as ``range``), cached on disk.

    Each pass of a level-set iteration is a few hundred microseconds of work at 512x512; measured
    on the 2-core machine of docs/benchmarks.md, waking a second thread for every pass cost more
    than it saved, and the ``parallel=True`` form of these loops ran 4x slower on one thread. The
    heaviest pass, the Chan-Vese step (1.8 ms at 512x512 on one thread), took 0.9 ms on two
    threads at best but a median 12 ms with the machine's load average at 3.
    """
    import numba

    return cache_on_disk(numba.njit(nogil=True, error_model="numpy", cache=True)(fn))


def _row_bounds(task, rows):
    b = task // rows
    return b, task - b * rows


@functools.lru_cache(maxsize=None)
def _kernels():
    import numba
    from numba import prange

    inline = numba.njit(inline="always", nogil=True)
    row_bounds = inline(_row_bounds)

    # --- curvature operators: SI = max over line elements of the erosion, IS = min of dilations

    @cpu_serial_kernel
    def sup_inf_2d(src, dst):
        batch, height, width = src.shape[0], src.shape[1] - 2, src.shape[2] - 2
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            up, mid, down, out = src[b, y], src[b, y + 1], src[b, y + 2], dst[b, y + 1]
            for x in range(1, width + 1):
                out[x] = mid[x] & ((up[x - 1] & down[x + 1]) | (up[x] & down[x]) | (up[x + 1] & down[x - 1])
                                   | (mid[x - 1] & mid[x + 1]))

    @cpu_serial_kernel
    def inf_sup_2d(src, dst):
        batch, height, width = src.shape[0], src.shape[1] - 2, src.shape[2] - 2
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            up, mid, down, out = src[b, y], src[b, y + 1], src[b, y + 2], dst[b, y + 1]
            for x in range(1, width + 1):
                out[x] = mid[x] | ((up[x - 1] | down[x + 1]) & (up[x] | down[x]) & (up[x + 1] | down[x - 1])
                                   & (mid[x - 1] | mid[x + 1]))

    @inline
    def rows_3d(src, b, z, y):
        """The 9 rows around voxel row (z, y) of image b (padded coordinates of the centre - 1)."""
        return (src[b, z, y], src[b, z, y + 1], src[b, z, y + 2],
                src[b, z + 1, y], src[b, z + 1, y + 1], src[b, z + 1, y + 2],
                src[b, z + 2, y], src[b, z + 2, y + 1], src[b, z + 2, y + 2])

    # The 3-D elements are the 9 planes of 3x3 voxels through the centre; vABC is the voxel at
    # offset (A - 1, B - 1, C - 1) in (z, y, x), the centre v111 belongs to every plane.

    @cpu_serial_kernel
    def curvature_3d(src, dst, dilate):
        """SI (dilate False) or IS (dilate True): every plane contains the centre r11[x], so
        SI = centre & (any plane's other 8 all set), IS = centre | (every plane has one set)."""
        batch, depth, height, width = src.shape[0], src.shape[1] - 2, src.shape[2] - 2, src.shape[3] - 2
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            r00, r01, r02, r10, r11, r12, r20, r21, r22 = rows_3d(src, b, z, y)
            out = dst[b, z + 1, y + 1]
            for x in range(1, width + 1):
                v000, v001, v002 = r00[x - 1], r00[x], r00[x + 1]
                v010, v011, v012 = r01[x - 1], r01[x], r01[x + 1]
                v020, v021, v022 = r02[x - 1], r02[x], r02[x + 1]
                v100, v101, v102 = r10[x - 1], r10[x], r10[x + 1]
                v110, v112 = r11[x - 1], r11[x + 1]
                v120, v121, v122 = r12[x - 1], r12[x], r12[x + 1]
                v200, v201, v202 = r20[x - 1], r20[x], r20[x + 1]
                v210, v211, v212 = r21[x - 1], r21[x], r21[x + 1]
                v220, v221, v222 = r22[x - 1], r22[x], r22[x + 1]
                if dilate:
                    out[x] = r11[x] | (
                        (v001 | v011 | v021 | v101 | v121 | v201 | v211 | v221)
                        & (v010 | v011 | v012 | v110 | v112 | v210 | v211 | v212)
                        & (v100 | v101 | v102 | v110 | v112 | v120 | v121 | v122)
                        & (v000 | v011 | v022 | v100 | v122 | v200 | v211 | v222)
                        & (v002 | v011 | v020 | v102 | v120 | v202 | v211 | v220)
                        & (v000 | v101 | v202 | v010 | v212 | v020 | v121 | v222)
                        & (v002 | v101 | v200 | v012 | v210 | v022 | v121 | v220)
                        & (v000 | v110 | v220 | v001 | v221 | v002 | v112 | v222)
                        & (v020 | v110 | v200 | v021 | v201 | v022 | v112 | v202))
                else:
                    out[x] = r11[x] & (
                        (v001 & v011 & v021 & v101 & v121 & v201 & v211 & v221)
                        | (v010 & v011 & v012 & v110 & v112 & v210 & v211 & v212)
                        | (v100 & v101 & v102 & v110 & v112 & v120 & v121 & v122)
                        | (v000 & v011 & v022 & v100 & v122 & v200 & v211 & v222)
                        | (v002 & v011 & v020 & v102 & v120 & v202 & v211 & v220)
                        | (v000 & v101 & v202 & v010 & v212 & v020 & v121 & v222)
                        | (v002 & v101 & v200 & v012 & v210 & v022 & v121 & v220)
                        | (v000 & v110 & v220 & v001 & v221 & v002 & v112 & v222)
                        | (v020 & v110 & v200 & v021 & v201 & v022 & v112 & v202))

    # --- rows walked along x: the first and last pixel are peeled off (np.gradient's one-sided
    # ends, Chan-Vese's replicated edge) so the loop between them has no branch and vectorises.
    # Per-pixel helpers return their value and the kernel's own loop stores it (with the store,
    # or the loop, inside an inlined helper the pass ran 2-4x slower); updates are bit selects,
    # which vectorise, where a conditional expression did not.

    @inline
    def neighbours(i, n):
        """(index before, index after, 1 / their distance) of i along an axis of n >= 2 elements.
        The distance is 1 or 2, so multiplying by its inverse equals np.gradient's division."""
        before = i - 1 if i > 0 else i
        after = i + 1 if i < n - 1 else i
        return before, after, 0.5 if after - before == 2 else 1.0

    @inline
    def square(v):
        """v ** 2 written as the product it equals (NumPy's ** 2 is v * v too): Numba's ** 2
        kept the loops around it from vectorising."""
        return v * v

    @inline
    def slope(before, after, inverse):
        """One axis of np.gradient of a level set: (after - before) / distance in float64 (the
        difference taken in int32, exact, converted once)."""
        return float(np.int32(after) - np.int32(before)) * inverse

    @inline
    def select_sign(aux, old):
        """1 where aux > 0, 0 where aux < 0, else (0 or NaN) old."""
        return np.uint8(aux > 0) | (np.uint8(not aux < 0) & old)

    # --- MorphACWE: the means, then the attachment fused with the gradient predicate

    @inline
    def acwe_row(level, values, partial, task):
        """partial[task] = (sum I (1 - u), sum 1 - u, sum I u, sum u) over one row. The float
        sums run in 4 interleaved lanes (x mod 4, added at the end in lane order): a fixed order
        that vectorises, exact like any order for integer-valued images."""
        width = values.shape[0]
        lanes = width - width % 4
        out0, out1, out2, out3, in0, in1, in2, in3 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        count = 0
        for x in range(0, lanes, 4):
            u0, u1, u2, u3 = level[x + 1], level[x + 2], level[x + 3], level[x + 4]
            count += np.int64(u0) + np.int64(u1) + np.int64(u2) + np.int64(u3)
            out0 += values[x] * float(1 - u0)
            out1 += values[x + 1] * float(1 - u1)
            out2 += values[x + 2] * float(1 - u2)
            out3 += values[x + 3] * float(1 - u3)
            in0 += values[x] * float(u0)
            in1 += values[x + 1] * float(u1)
            in2 += values[x + 2] * float(u2)
            in3 += values[x + 3] * float(u3)
        for x in range(lanes, width):
            count += np.int64(level[x + 1])
            out0 += values[x] * float(1 - level[x + 1])
            in0 += values[x] * float(level[x + 1])
        partial[task, 0] = ((out0 + out1) + out2) + out3
        partial[task, 1] = float(width - count)
        partial[task, 2] = ((in0 + in1) + in2) + in3
        partial[task, 3] = float(count)

    @cpu_serial_kernel
    def acwe_row_sums_2d(u, image, partial):
        batch, height = image.shape[0], image.shape[1]
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            acwe_row(u[b, y + 1], image[b, y], partial, task)

    @cpu_serial_kernel
    def acwe_row_sums_3d(u, image, partial):
        batch, depth, height = image.shape[0], image.shape[1], image.shape[2]
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            acwe_row(u[b, z + 1, y + 1], image[b, z, y], partial, task)

    @cpu_serial_kernel
    def acwe_means(partial, rows, means):
        """means[b] = (c0, c1) from the row sums of image b, added in row order."""
        batch = means.shape[0]
        for b in prange(batch):
            s0 = n0 = s1 = n1 = 0.0
            for r in range(b * rows, (b + 1) * rows):
                s0 += partial[r, 0]
                n0 += partial[r, 1]
                s1 += partial[r, 2]
                n1 += partial[r, 3]
            means[b, 0] = s0 / (n0 + 1e-8)
            means[b, 1] = s1 / (n1 + 1e-8)

    @inline
    def acwe_pixel(mid, up, down, dy, front, back, dz, value, x, x0, x1, dx, c0, c1, lambda1, lambda2):
        """The attachment at image column x (x0, x1, dx: its neighbours along x). In 2-D front and
        back are mid: their slope is 0.0 and adds nothing (the sum of |slopes| is exact)."""
        abs_du = (abs(slope(front[x + 1], back[x + 1], dz)) + abs(slope(up[x + 1], down[x + 1], dy))
                  + abs(slope(mid[x0 + 1], mid[x1 + 1], dx)))
        aux = abs_du * (lambda1 * square(value - c1) - lambda2 * square(value - c0))
        return select_sign(-aux, mid[x + 1])

    @cpu_serial_kernel
    def acwe_attach_2d(src, image, means, lambda1, lambda2, dst):
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        last = width - 1
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            y0, y1, dy = neighbours(y, height)
            mid, up, down, out, values = src[b, y + 1], src[b, y0 + 1], src[b, y1 + 1], dst[b, y + 1], image[b, y]
            c0, c1 = means[b, 0], means[b, 1]
            out[1] = acwe_pixel(mid, up, down, dy, mid, mid, 1.0, values[0], 0, 0, 1, 1.0, c0, c1, lambda1, lambda2)
            for x in range(1, last):
                out[x + 1] = acwe_pixel(mid, up, down, dy, mid, mid, 1.0, values[x], x, x - 1, x + 1, 0.5, c0, c1,
                                        lambda1, lambda2)
            out[last + 1] = acwe_pixel(mid, up, down, dy, mid, mid, 1.0, values[last], last, last - 1, last, 1.0, c0,
                                       c1, lambda1, lambda2)

    @cpu_serial_kernel
    def acwe_attach_3d(src, image, means, lambda1, lambda2, dst):
        batch, depth, height, width = image.shape[0], image.shape[1], image.shape[2], image.shape[3]
        last = width - 1
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            z0, z1, dz = neighbours(z, depth)
            y0, y1, dy = neighbours(y, height)
            mid, front, back = src[b, z + 1, y + 1], src[b, z0 + 1, y + 1], src[b, z1 + 1, y + 1]
            up, down, out, values = src[b, z + 1, y0 + 1], src[b, z + 1, y1 + 1], dst[b, z + 1, y + 1], image[b, z, y]
            c0, c1 = means[b, 0], means[b, 1]
            out[1] = acwe_pixel(mid, up, down, dy, front, back, dz, values[0], 0, 0, 1, 1.0, c0, c1, lambda1, lambda2)
            for x in range(1, last):
                out[x + 1] = acwe_pixel(mid, up, down, dy, front, back, dz, values[x], x, x - 1, x + 1, 0.5, c0, c1,
                                        lambda1, lambda2)
            out[last + 1] = acwe_pixel(mid, up, down, dy, front, back, dz, values[last], last, last - 1, last, 1.0, c0,
                                       c1, lambda1, lambda2)

    # --- MorphGAC: the balloon fused with its masked update, then the attachment

    @cpu_serial_kernel
    def gac_balloon_2d(src, gimage, limit, grow, dst):
        """dst = the 3x3 box dilation (grow) or erosion of src where gimage > limit[b], else src."""
        batch, height, width = gimage.shape[0], gimage.shape[1], gimage.shape[2]
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            up, mid, down, out, values, bound = src[b, y], src[b, y + 1], src[b, y + 2], dst[b, y + 1], gimage[b, y], \
                limit[b]
            if grow:
                for x in range(1, width + 1):
                    box = (up[x - 1] | up[x] | up[x + 1] | mid[x - 1] | mid[x] | mid[x + 1] | down[x - 1] | down[x]
                           | down[x + 1])
                    masked = np.uint8(values[x - 1] > bound)
                    out[x] = (box & masked) | (mid[x] & (masked ^ 1))
            else:
                for x in range(1, width + 1):
                    box = (up[x - 1] & up[x] & up[x + 1] & mid[x - 1] & mid[x] & mid[x + 1] & down[x - 1] & down[x]
                           & down[x + 1])
                    masked = np.uint8(values[x - 1] > bound)
                    out[x] = (box & masked) | (mid[x] & (masked ^ 1))

    @cpu_serial_kernel
    def gac_balloon_3d(src, gimage, limit, grow, dst):
        batch, depth, height, width = gimage.shape[0], gimage.shape[1], gimage.shape[2], gimage.shape[3]
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            rows = rows_3d(src, b, z, y)
            out, values, bound = dst[b, z + 1, y + 1], gimage[b, z, y], limit[b]
            for x in range(1, width + 1):
                if grow:
                    box = np.uint8(0)
                    for row in rows:
                        box |= row[x - 1] | row[x] | row[x + 1]
                else:
                    box = np.uint8(1)
                    for row in rows:
                        box &= row[x - 1] & row[x] & row[x + 1]
                masked = np.uint8(values[x - 1] > bound)
                out[x] = (box & masked) | (rows[4][x] & (masked ^ 1))

    @inline
    def gac_pixel_2d(mid, up, down, dy, g_y, g_x, x, x0, x1, dx):
        """u = 1 where sum_i gradient_i(gimage) gradient_i(u) > 0, 0 where < 0 (axis order)."""
        aux = g_y[x] * slope(up[x + 1], down[x + 1], dy) + g_x[x] * slope(mid[x0 + 1], mid[x1 + 1], dx)
        return select_sign(aux, mid[x + 1])

    @cpu_serial_kernel
    def gac_attach_2d(src, gradient, dst):
        batch, height, width = gradient.shape[0], gradient.shape[2], gradient.shape[3]
        last = width - 1
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            y0, y1, dy = neighbours(y, height)
            mid, up, down, out = src[b, y + 1], src[b, y0 + 1], src[b, y1 + 1], dst[b, y + 1]
            g_y, g_x = gradient[b, 0, y], gradient[b, 1, y]
            out[1] = gac_pixel_2d(mid, up, down, dy, g_y, g_x, 0, 0, 1, 1.0)
            for x in range(1, last):
                out[x + 1] = gac_pixel_2d(mid, up, down, dy, g_y, g_x, x, x - 1, x + 1, 0.5)
            out[last + 1] = gac_pixel_2d(mid, up, down, dy, g_y, g_x, last, last - 1, last, 1.0)

    @inline
    def gac_pixel_3d(mid, up, down, dy, front, back, dz, g_z, g_y, g_x, x, x0, x1, dx):
        aux = (g_z[x] * slope(front[x + 1], back[x + 1], dz) + g_y[x] * slope(up[x + 1], down[x + 1], dy)
               + g_x[x] * slope(mid[x0 + 1], mid[x1 + 1], dx))
        return select_sign(aux, mid[x + 1])

    @cpu_serial_kernel
    def gac_attach_3d(src, gradient, dst):
        batch, depth, height, width = gradient.shape[0], gradient.shape[2], gradient.shape[3], gradient.shape[4]
        last = width - 1
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            z0, z1, dz = neighbours(z, depth)
            y0, y1, dy = neighbours(y, height)
            mid, front, back = src[b, z + 1, y + 1], src[b, z0 + 1, y + 1], src[b, z1 + 1, y + 1]
            up, down, out = src[b, z + 1, y0 + 1], src[b, z + 1, y1 + 1], dst[b, z + 1, y + 1]
            g_z, g_y, g_x = gradient[b, 0, z, y], gradient[b, 1, z, y], gradient[b, 2, z, y]
            out[1] = gac_pixel_3d(mid, up, down, dy, front, back, dz, g_z, g_y, g_x, 0, 0, 1, 1.0)
            for x in range(1, last):
                out[x + 1] = gac_pixel_3d(mid, up, down, dy, front, back, dz, g_z, g_y, g_x, x, x - 1, x + 1, 0.5)
            out[last + 1] = gac_pixel_3d(mid, up, down, dy, front, back, dz, g_z, g_y, g_x, last, last - 1, last, 1.0)

    # --- Chan-Vese: one fused Jacobi step per iteration, with the next iteration's sums

    @inline
    def chan_vese_pixel(phi, up, down, x, x0, x1, value, c1, c2, mu, lambda1, lambda2, dt):
        centre, right, left = phi[x], phi[x1], phi[x0]
        below, above = down[x], up[x]
        dx_mid, dy_mid = (right - left) / 2.0, (below - above) / 2.0
        k1 = 1.0 / np.sqrt(1e-16 + square(right - centre) + square(dy_mid))
        k2 = 1.0 / np.sqrt(1e-16 + square(centre - left) + square(dy_mid))
        k3 = 1.0 / np.sqrt(1e-16 + square(dx_mid) + square(below - centre))
        k4 = 1.0 / np.sqrt(1e-16 + square(dx_mid) + square(centre - above))
        curvature = right * k1 + left * k2 + below * k3 + above * k4
        delta = 1.0 / (1.0 + square(centre))
        force = -lambda1 * square(value - c1) + lambda2 * square(value - c2)
        return (centre + dt * delta * (mu * curvature + force)) / (1.0 + mu * dt * delta * (k1 + k2 + k3 + k4))

    @inline
    def region_sums(phi, previous, values, partial, task):
        """partial[task] = (sum f H, sum H, sum f (1 - H), sum 1 - H, sum (phi - previous)^2) over
        one row, H = phi > 0; the float sums in 4 interleaved lanes (x mod 4) added in lane order
        at the end, a fixed order that vectorises."""
        width = values.shape[0]
        lanes = width - width % 4
        in0, in1, in2, in3, out0, out1, out2, out3 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        change0, change1, change2, change3 = 0.0, 0.0, 0.0, 0.0
        count = 0
        for x in range(0, lanes, 4):
            h0, h1 = np.int64(phi[x] > 0), np.int64(phi[x + 1] > 0)
            h2, h3 = np.int64(phi[x + 2] > 0), np.int64(phi[x + 3] > 0)
            count += h0 + h1 + h2 + h3
            in0 += values[x] * float(h0)
            in1 += values[x + 1] * float(h1)
            in2 += values[x + 2] * float(h2)
            in3 += values[x + 3] * float(h3)
            out0 += values[x] * float(1 - h0)
            out1 += values[x + 1] * float(1 - h1)
            out2 += values[x + 2] * float(1 - h2)
            out3 += values[x + 3] * float(1 - h3)
            change0 += square(phi[x] - previous[x])
            change1 += square(phi[x + 1] - previous[x + 1])
            change2 += square(phi[x + 2] - previous[x + 2])
            change3 += square(phi[x + 3] - previous[x + 3])
        for x in range(lanes, width):
            h = np.int64(phi[x] > 0)
            count += h
            in0 += values[x] * float(h)
            out0 += values[x] * float(1 - h)
            change0 += square(phi[x] - previous[x])
        partial[task, 0] = ((in0 + in1) + in2) + in3
        partial[task, 1] = float(count)
        partial[task, 2] = ((out0 + out1) + out2) + out3
        partial[task, 3] = float(width - count)
        partial[task, 4] = ((change0 + change1) + change2) + change3

    @cpu_serial_kernel
    def chan_vese_row_sums(phi, image, partial):
        """partial[task] = (sum f H, sum H, sum f (1 - H), sum 1 - H, 0), H = phi > 0, one row."""
        batch, height = image.shape[0], image.shape[1]
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            region_sums(phi[b, y], phi[b, y], image[b, y], partial, task)

    @cpu_serial_kernel
    def chan_vese_step(phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
        """new_phi = one step of phi for the active images; partial[task] = the row sums of
        new_phi (as chan_vese_row_sums) and the row's sum of squared changes."""
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        last = width - 1
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            if not active[b]:
                continue
            c1, c2 = stats[b, 0], stats[b, 1]
            y0, y1, _ = neighbours(y, height)
            row, up, down, values, out = phi[b, y], phi[b, y0], phi[b, y1], image[b, y], new_phi[b, y]
            out[0] = chan_vese_pixel(row, up, down, 0, 0, min(1, last), values[0], c1, c2, mu, lambda1, lambda2, dt)
            for x in range(1, last):
                out[x] = chan_vese_pixel(row, up, down, x, x - 1, x + 1, values[x], c1, c2, mu, lambda1, lambda2, dt)
            if last > 0:
                out[last] = chan_vese_pixel(row, up, down, last, last - 1, last, values[last], c1, c2, mu, lambda1,
                                            lambda2, dt)
            region_sums(out, row, values, partial, task)

    @cpu_serial_kernel
    def chan_vese_stats(partial, rows, pixels, stats):
        """stats[b] = (c1, c2, RMS change) from the row sums of image b, added in row order."""
        batch = stats.shape[0]
        for b in prange(batch):
            s_in = n_in = s_out = n_out = change = 0.0
            for r in range(b * rows, (b + 1) * rows):
                s_in += partial[r, 0]
                n_in += partial[r, 1]
                s_out += partial[r, 2]
                n_out += partial[r, 3]
                change += partial[r, 4]
            stats[b, 0] = s_in / n_in if n_in != 0 else s_in
            stats[b, 1] = s_out / n_out if n_out != 0 else s_out
            stats[b, 2] = np.sqrt(change / pixels)

    return dict(sup_inf_2d=sup_inf_2d, inf_sup_2d=inf_sup_2d, curvature_3d=curvature_3d,
                acwe_row_sums_2d=acwe_row_sums_2d, acwe_row_sums_3d=acwe_row_sums_3d, acwe_means=acwe_means,
                acwe_attach_2d=acwe_attach_2d, acwe_attach_3d=acwe_attach_3d, gac_balloon_2d=gac_balloon_2d, gac_balloon_3d=gac_balloon_3d,
                gac_attach_2d=gac_attach_2d, gac_attach_3d=gac_attach_3d, chan_vese_row_sums=chan_vese_row_sums,
                chan_vese_step=chan_vese_step, chan_vese_stats=chan_vese_stats)


def _rows(image):
    """The number of rows (tasks) of one image: every axis of its shape but the last."""
    return int(np.prod(image.shape[1:-1]))


class NumbaCpuLevelSetKernels:
    """Level-set kernels for NumPy arrays, one CPU thread per call (see cpu_serial_kernel).

    Level sets are uint8 ``[B, *(S + 2)]`` with a zero border, images float64 ``[B, *S]`` (see the
    module docstring); ``ndim`` below is the number of image axes (2 or 3).
    """

    xp = np

    @staticmethod
    def _pick(name, ndim):
        return _kernels()[f"{name}_{ndim}d"]

    def sup_inf(self, src, dst):
        if src.ndim == 3:
            _kernels()["sup_inf_2d"](src, dst)
        else:
            _kernels()["curvature_3d"](src, dst, False)

    def inf_sup(self, src, dst):
        if src.ndim == 3:
            _kernels()["inf_sup_2d"](src, dst)
        else:
            _kernels()["curvature_3d"](src, dst, True)

    def acwe_means(self, u, image, partial, means):
        """means [B, 2] float64 = (c0, c1) of each image; partial: scratch [B * rows, 4]."""
        self._pick("acwe_row_sums", image.ndim - 1)(u, image, partial)
        _kernels()["acwe_means"](partial, _rows(image), means)

    def acwe_attach(self, src, image, means, lambda1, lambda2, dst):
        self._pick("acwe_attach", image.ndim - 1)(src, image, means, lambda1, lambda2, dst)

    def gac_balloon(self, src, gimage, limit, grow, dst):
        self._pick("gac_balloon", gimage.ndim - 1)(src, gimage, limit, grow, dst)

    def gac_attach(self, src, gradient, dst):
        self._pick("gac_attach", gradient.ndim - 2)(src, gradient, dst)

    def chan_vese_start(self, phi, image, partial, stats):
        """stats [B, 3] = (c1, c2, 0) of phi; partial: scratch [B * H, 5]."""
        kernels = _kernels()
        kernels["chan_vese_row_sums"](phi, image, partial)
        kernels["chan_vese_stats"](partial, image.shape[1], float(image.shape[1] * image.shape[2]), stats)

    def chan_vese_step(self, phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
        """new_phi = one step for the images where active [B] uint8 is set; stats becomes
        (c1, c2, RMS change) of new_phi for them."""
        kernels = _kernels()
        kernels["chan_vese_step"](phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial)
        kernels["chan_vese_stats"](partial, image.shape[1], float(image.shape[1] * image.shape[2]), stats)


# --- Numba CUDA kernels ---------------------------------------------------------------------------
#
# The same layouts as above, indexed flat. One kernel serves 2-D, 3-D and the batch: its geometry
# is ``(batch, depth, height, width, volume)`` with ``depth = 1, volume = 0`` in 2-D, so a pixel is
# an item of a grid-stride loop over ``batch * depth * height * width`` whatever the rank. Sums are
# reduced without float atomics, in an order fixed by the launch: one block per image row adds
# its pixels (each thread a strided share, then a shared-memory tree), one block per image adds
# its rows the same way, and the means stay on the device for the next kernel.

import math  # noqa: E402
import operator  # noqa: E402

from .targets import THREADS_PER_BLOCK, bind_cuda, cuda_kernel, cuda_target, flat, launch_cuda  # noqa: E402

# numba.cuda as a module global, bound by cuda_kernels() (see targets.bind_cuda).
cuda = None

CUDA_KERNELS = ("curvature", "acwe_row_sums", "acwe_means", "acwe_attach", "gac_balloon", "gac_attach",
                "chan_vese_sums", "chan_vese_step", "chan_vese_stats")


def _unfused_arithmetic():
    """(multiply, add) of float64 values, each rounded on its own.

    NVVM, and ptxas for a PTX ``mul.f64`` feeding an ``add.f64`` / ``sub.f64``, contract
    ``a * b - c * d`` into an FMA by default (numba-cuda offers no switch for that but fastmath,
    which also flushes subnormals and loosens division and sqrt), and an FMA skips the rounding
    of the product: the MorphACWE attachment's sign then differs from NumPy's (scikit-image's)
    where the two terms nearly cancel. libdevice's ``dmul_rn`` / ``dadd_rn`` are PTX
    ``mul.rn.f64`` / ``add.rn.f64``, whose explicit rounding mode keeps both compilers from
    fusing them (a subtraction is the addition of the negation, exact). The simulator runs
    Python arithmetic, which never fuses either.
    """
    from ..numba_cuda import libdevice, simulator_enabled

    if simulator_enabled():
        return operator.mul, operator.add
    return libdevice().dmul_rn, libdevice().dadd_rn


@functools.lru_cache(maxsize=None)
def cuda_kernels():
    """The CUDA kernels, in the order of ``CUDA_KERNELS``."""
    global cuda
    cuda = bind_cuda()
    device = cuda_target(np.float64).device
    multiply, add = _unfused_arithmetic()

    @device
    def padded_row(row, geometry):
        """The flat index in a padded level set of the first pixel of image row ``row`` (rows
        counted over the batch)."""
        batch, depth, height, width, volume = geometry
        y = row % height
        z = (row // height) % depth
        b = row // (depth * height)
        return ((b * (depth + 2 * volume) + z + volume) * (height + 2) + y + 1) * (width + 2) + 1

    @device
    def line_set(src, c, a, dilate):
        """Dilation (any set) or erosion (all set) of the line element {c - a, c, c + a}."""
        if dilate:
            return src[c - a] | src[c] | src[c + a]
        return src[c - a] & src[c] & src[c + a]

    @device
    def plane_set(src, c, a, b, dilate):
        """Dilation (any set) or erosion (all set) of the 3x3 element {c + i a + j b}."""
        hit = not dilate
        for i in range(-1, 2):
            for j in range(-1, 2):
                if dilate:
                    hit = hit or src[c + i * a + j * b] != 0
                else:
                    hit = hit and src[c + i * a + j * b] != 0
        return hit

    @cuda_kernel
    def curvature(src, dst, geometry, dilate):
        """SI (dilate False: the largest erosion by the line elements) or IS (the smallest
        dilation). Every element holds the centre, so the centre needs no term of its own."""
        batch, depth, height, width, volume = geometry
        sy = width + 2
        sz = (height + 2) * sy
        for item in range(cuda.grid(1), batch * depth * height * width, cuda.gridsize(1)):
            c = padded_row(item // width, geometry) + item % width
            result = dilate
            if volume:  # the 9 planes of 3x3 voxels through the centre, as two spanning offsets
                for a, b in ((sz, sy), (sz, 1), (sy, 1), (sz, sy + 1), (sz, sy - 1), (sy, sz + 1), (sy, sz - 1),
                             (1, sz + sy), (1, sz - sy)):
                    if dilate:
                        result = result and plane_set(src, c, a, b, True)
                    else:
                        result = result or plane_set(src, c, a, b, False)
            else:  # the 4 segments of 3 pixels: vertical, horizontal and the two diagonals
                for a in (sy, 1, sy + 1, sy - 1):
                    if dilate:
                        result = result and line_set(src, c, a, True) != 0
                    else:
                        result = result or line_set(src, c, a, False) != 0
            dst[c] = result

    @device
    def block_total(sums, count):
        """Adds each of the first ``count`` rows of ``sums`` [k, thread] into its column 0, in a
        fixed tree (the block size is a power of 2)."""
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x // 2
        cuda.syncthreads()
        while step > 0:
            if tid < step:
                for k in range(count):
                    sums[k, tid] += sums[k, tid + step]
            cuda.syncthreads()
            step //= 2

    @device
    def store_row_sums(sums, count, partial, row):
        """partial[row] = the block's totals of the first ``count`` rows of ``sums``. No barrier
        follows: column 0, read here, is written next by thread 0 only."""
        block_total(sums, count)
        if cuda.threadIdx.x == 0:
            for k in range(count):
                partial[row * count + k] = sums[k, 0]

    @device
    def image_totals(partial, count, rows, b, sums):
        """sums[:count, 0] = the sums over the rows of image b of partial [rows, count], each
        thread adding a strided share of the rows in order, then the tree."""
        tid = cuda.threadIdx.x
        for k in range(count):
            sums[k, tid] = 0.0
        for r in range(b * rows + tid, (b + 1) * rows, cuda.blockDim.x):
            for k in range(count):
                sums[k, tid] += partial[r * count + k]
        block_total(sums, count)

    # --- MorphACWE

    @cuda_kernel
    def acwe_row_sums(u, image, partial, geometry):
        """partial[row] = (sum I (1 - u), sum 1 - u, sum I u, sum u) over each image row (the
        products by 0 or 1 are exact, so an FMA of product and sum rounds as NumPy does)."""
        batch, depth, height, width, volume = geometry
        sums = cuda.shared.array((4, THREADS_PER_BLOCK), np.float64)
        tid = cuda.threadIdx.x
        for row in range(cuda.blockIdx.x, batch * depth * height, cuda.gridDim.x):
            start = padded_row(row, geometry)
            for k in range(4):
                sums[k, tid] = 0.0
            for x in range(tid, width, cuda.blockDim.x):
                inside, value = float(u[start + x]), image[row * width + x]
                sums[0, tid] += value * (1.0 - inside)
                sums[1, tid] += 1.0 - inside
                sums[2, tid] += value * inside
                sums[3, tid] += inside
            store_row_sums(sums, 4, partial, row)

    @cuda_kernel
    def acwe_means(partial, rows, means, batch):
        """means[b] = (c0, c1) from the row sums of image b."""
        sums = cuda.shared.array((4, THREADS_PER_BLOCK), np.float64)
        for b in range(cuda.blockIdx.x, batch, cuda.gridDim.x):
            image_totals(partial, 4, rows, b, sums)
            if cuda.threadIdx.x == 0:
                means[2 * b] = sums[0, 0] / (sums[1, 0] + 1e-8)
                means[2 * b + 1] = sums[2, 0] / (sums[3, 0] + 1e-8)

    @device
    def slope(src, c, i, n, stride):
        """np.gradient of the level set at index i of an axis of n >= 2 elements (flat stride
        ``stride``): central (halved, exactly) inside, one-sided at the ends."""
        before = c - stride if i > 0 else c
        after = c + stride if i < n - 1 else c
        difference = float(np.int32(src[after]) - np.int32(src[before]))
        return difference * 0.5 if 0 < i < n - 1 else difference

    @device
    def select_sign(aux, old):
        """1 where aux > 0, 0 where aux < 0, else (0 or NaN) old."""
        return 1 if aux > 0 else (0 if aux < 0 else old)

    @device
    def level_slopes(src, item, geometry):
        """(image b, padded index c, np.gradient of the level set along z, y, x) at pixel
        ``item``; in 2-D the z axis has one element and its slope is 0.0."""
        batch, depth, height, width, volume = geometry
        row, x = item // width, item % width
        y, z = row % height, (row // height) % depth
        c = padded_row(row, geometry) + x
        sy = width + 2
        return (item // (depth * height * width), c, slope(src, c, z, depth, (height + 2) * sy),
                slope(src, c, y, height, sy), slope(src, c, x, width, 1))

    @cuda_kernel
    def acwe_attach(src, image, means, lambda1, lambda2, dst, geometry):
        """u = 1 where |grad u| (lambda1 (I - c1)^2 - lambda2 (I - c0)^2) < 0, 0 where > 0, in
        NumPy's rounding (see _unfused_arithmetic)."""
        batch, depth, height, width, volume = geometry
        for item in range(cuda.grid(1), batch * depth * height * width, cuda.gridsize(1)):
            b, c, du_z, du_y, du_x = level_slopes(src, item, geometry)
            abs_du = abs(du_z) + abs(du_y) + abs(du_x)  # halves and ones: exact in any order
            value = image[item]
            outside, inside = value - means[2 * b], value - means[2 * b + 1]
            force = add(multiply(lambda1, multiply(inside, inside)), -multiply(lambda2, multiply(outside, outside)))
            dst[c] = select_sign(-multiply(abs_du, force), src[c])

    # --- MorphGAC

    @cuda_kernel
    def gac_balloon(src, gimage, limit, grow, dst, geometry):
        """dst = the 3x3(x3) box dilation (grow) or erosion of src where gimage > limit[b], else src."""
        batch, depth, height, width, volume = geometry
        sy = width + 2
        sz = (height + 2) * sy
        plane = depth * height * width
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            c = padded_row(item // width, geometry) + item % width
            if gimage[item] > limit[item // plane]:
                box = plane_set(src, c, sy, 1, grow)
                if volume:
                    for k in (-1, 1):
                        if grow:
                            box = box or plane_set(src, c + k * sz, sy, 1, True)
                        else:
                            box = box and plane_set(src, c + k * sz, sy, 1, False)
                dst[c] = box
            else:
                dst[c] = src[c]

    @cuda_kernel
    def gac_attach(src, gradient, dst, geometry):
        """u = 1 where sum_i gradient_i(gimage) gradient_i(u) > 0, 0 where < 0: the sum from 0 in
        axis order as scikit-image's, each product rounded (see _unfused_arithmetic)."""
        batch, depth, height, width, volume = geometry
        plane = depth * height * width
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            b, c, du_z, du_y, du_x = level_slopes(src, item, geometry)
            g = b * (1 + volume) * plane + item  # gradient[b, 0] at this pixel ([B, 2 + volume, plane])
            aux = 0.0
            if volume:
                aux += multiply(gradient[g], du_z)
                g += plane
            aux += multiply(gradient[g], du_y)
            aux += multiply(gradient[g + plane], du_x)
            dst[c] = select_sign(aux, src[c])

    # --- Chan-Vese: [B, H, W] float64, one block a row; the step fused with the next sums

    @device
    def add_region_sums(sums, value, new, old):
        """Adds (f H, H, f (1 - H), 1 - H, (new - old)^2), H = new > 0, to this thread's sums."""
        tid = cuda.threadIdx.x
        inside = 1.0 if new > 0 else 0.0
        sums[0, tid] += value * inside
        sums[1, tid] += inside
        sums[2, tid] += value * (1.0 - inside)
        sums[3, tid] += 1.0 - inside
        sums[4, tid] += (new - old) * (new - old)

    @cuda_kernel
    def chan_vese_sums(phi, image, partial, batch, height, width):
        """partial[row] = the region sums of phi (no change) over each image row."""
        sums = cuda.shared.array((5, THREADS_PER_BLOCK), np.float64)
        tid = cuda.threadIdx.x
        for row in range(cuda.blockIdx.x, batch * height, cuda.gridDim.x):
            for k in range(5):
                sums[k, tid] = 0.0
            for x in range(tid, width, cuda.blockDim.x):
                add_region_sums(sums, image[row * width + x], phi[row * width + x], phi[row * width + x])
            store_row_sums(sums, 5, partial, row)

    @device
    def chan_vese_pixel(phi, up, row, down, x, width, value, c1, c2, mu, lambda1, lambda2, dt):
        """One Jacobi step at (row, x); up / row / down: the flat starts of the rows above (the
        row itself at the top), of the row and below; differences replicate the edge."""
        centre = phi[row + x]
        left, right = phi[row + max(x - 1, 0)], phi[row + min(x + 1, width - 1)]
        above, below = phi[up + x], phi[down + x]
        dx_mid, dy_mid = (right - left) / 2.0, (below - above) / 2.0
        k1 = 1.0 / math.sqrt(1e-16 + (right - centre) * (right - centre) + dy_mid * dy_mid)
        k2 = 1.0 / math.sqrt(1e-16 + (centre - left) * (centre - left) + dy_mid * dy_mid)
        k3 = 1.0 / math.sqrt(1e-16 + dx_mid * dx_mid + (below - centre) * (below - centre))
        k4 = 1.0 / math.sqrt(1e-16 + dx_mid * dx_mid + (centre - above) * (centre - above))
        curvature = right * k1 + left * k2 + below * k3 + above * k4
        delta = 1.0 / (1.0 + centre * centre)
        force = -lambda1 * ((value - c1) * (value - c1)) + lambda2 * ((value - c2) * (value - c2))
        return (centre + dt * delta * (mu * curvature + force)) / (1.0 + mu * dt * delta * (k1 + k2 + k3 + k4))

    @cuda_kernel
    def chan_vese_step(phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial, batch, height, width):
        """new_phi = one step of phi for the active images; partial[row] = the region sums of
        new_phi and the squared changes over the row (rows of inactive images untouched)."""
        sums = cuda.shared.array((5, THREADS_PER_BLOCK), np.float64)
        tid = cuda.threadIdx.x
        for row in range(cuda.blockIdx.x, batch * height, cuda.gridDim.x):
            b, y = row // height, row % height
            if not active[b]:  # the same for the whole block: no barrier is skipped by a part of it
                continue
            start = row * width
            up = start - width if y > 0 else start
            down = start + width if y < height - 1 else start
            c1, c2 = stats[3 * b], stats[3 * b + 1]
            for k in range(5):
                sums[k, tid] = 0.0
            for x in range(tid, width, cuda.blockDim.x):
                new = chan_vese_pixel(phi, up, start, down, x, width, image[start + x], c1, c2, mu, lambda1, lambda2,
                                      dt)
                new_phi[start + x] = new
                add_region_sums(sums, image[start + x], new, phi[start + x])
            store_row_sums(sums, 5, partial, row)

    @cuda_kernel
    def chan_vese_stats(partial, rows, pixels, stats, batch):
        """stats[b] = (c1, c2, RMS change) from the row sums of image b."""
        sums = cuda.shared.array((5, THREADS_PER_BLOCK), np.float64)
        for b in range(cuda.blockIdx.x, batch, cuda.gridDim.x):
            image_totals(partial, 5, rows, b, sums)
            if cuda.threadIdx.x == 0:
                stats[3 * b] = sums[0, 0] / sums[1, 0] if sums[1, 0] != 0 else sums[0, 0]
                stats[3 * b + 1] = sums[2, 0] / sums[3, 0] if sums[3, 0] != 0 else sums[2, 0]
                stats[3 * b + 2] = math.sqrt(sums[4, 0] / pixels)

    return (curvature, acwe_row_sums, acwe_means, acwe_attach, gac_balloon, gac_attach, chan_vese_sums,
            chan_vese_step, chan_vese_stats)


def _cuda_geometry(level_set):
    """(batch, depth, height, width, volume) of a padded level set [B, *(S + 2)]; depth 1 and
    volume 0 in 2-D."""
    inner = tuple(n - 2 for n in level_set.shape[1:])
    if len(inner) == 2:
        return (level_set.shape[0], 1, *inner, 0)
    return (level_set.shape[0], *inner, 1)


def _items(geometry):
    batch, depth, height, width, _ = geometry
    return batch * depth * height * width


class NumbaCudaLevelSetKernels:
    """The level-set kernels compiled with ``numba.cuda.jit`` for CuPy arrays, the interface of
    :class:`NumbaCpuLevelSetKernels`. The reductions launch one block per image row, then one
    per image (``THREADS_PER_BLOCK`` threads each). With ``xp=numpy`` the kernels run on host
    arrays under the CUDA simulator."""

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    def _run(self, name, n_items, *args):
        launch_cuda(cuda_kernels()[CUDA_KERNELS.index(name)], n_items, self.xp, *args)

    def _curvature(self, src, dst, dilate):
        geometry = _cuda_geometry(src)
        self._run("curvature", _items(geometry), flat(src), flat(dst), geometry, dilate)

    def sup_inf(self, src, dst):
        self._curvature(src, dst, False)

    def inf_sup(self, src, dst):
        self._curvature(src, dst, True)

    def acwe_means(self, u, image, partial, means):
        """means [B, 2] float64 = (c0, c1) of each image; partial: scratch [B * rows, 4]."""
        geometry = _cuda_geometry(u)
        rows = _rows(image)
        self._run("acwe_row_sums", image.shape[0] * rows * THREADS_PER_BLOCK, flat(u), flat(image), flat(partial),
                  geometry)
        self._run("acwe_means", image.shape[0] * THREADS_PER_BLOCK, flat(partial), rows, flat(means), image.shape[0])

    def acwe_attach(self, src, image, means, lambda1, lambda2, dst):
        geometry = _cuda_geometry(src)
        self._run("acwe_attach", _items(geometry), flat(src), flat(image), flat(means), float(lambda1),
                  float(lambda2), flat(dst), geometry)

    def gac_balloon(self, src, gimage, limit, grow, dst):
        geometry = _cuda_geometry(src)
        self._run("gac_balloon", _items(geometry), flat(src), flat(gimage), flat(limit), bool(grow), flat(dst),
                  geometry)

    def gac_attach(self, src, gradient, dst):
        geometry = _cuda_geometry(src)
        self._run("gac_attach", _items(geometry), flat(src), flat(gradient), flat(dst), geometry)

    def chan_vese_start(self, phi, image, partial, stats):
        """stats [B, 3] = (c1, c2, 0) of phi; partial: scratch [B * H, 5]."""
        batch, height, width = image.shape
        self._run("chan_vese_sums", batch * height * THREADS_PER_BLOCK, flat(phi), flat(image), flat(partial), batch,
                  height, width)
        self._stats(partial, image, stats)

    def chan_vese_step(self, phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
        """new_phi = one step for the images where active [B] uint8 is set; stats becomes
        (c1, c2, RMS change) of new_phi for them."""
        batch, height, width = image.shape
        self._run("chan_vese_step", batch * height * THREADS_PER_BLOCK, flat(phi), flat(image), flat(stats),
                  float(mu), float(lambda1), float(lambda2), float(dt), flat(active), flat(new_phi), flat(partial),
                  batch, height, width)
        self._stats(partial, image, stats)

    def _stats(self, partial, image, stats):
        batch, height, width = image.shape
        self._run("chan_vese_stats", batch * THREADS_PER_BLOCK, flat(partial), height, float(height * width),
                  flat(stats), batch)
