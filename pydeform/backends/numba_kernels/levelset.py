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
