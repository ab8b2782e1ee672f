"""Level-set kernels for the Numba CPU target: morphological snakes and Chan-Vese.

Layouts (docs/levelset.md): a batch of B images of one shape S (2-D ``[H, W]`` or 3-D
``[D, H, W]``); images float64 ``[B, *S]``; level sets uint8 ``[B, *(S + 2)]`` with a border of
zeros one pixel wide that every kernel leaves zero, so erosion and dilation read 0 outside the
image with no bounds test. Every step is Jacobi: a kernel reads one level-set buffer and writes
the other.

A task is one row (a fixed ``b``, and ``z`` in 3-D, ``y``) walked along x, or for the curvature
operators one padded plane walked as a single flat row; tasks run in order on one thread, but
the Chan-Vese step's blocks of rows, which go to Numba's threads.
Reductions are deterministic: the MorphACWE sums are kept per column (added over the rows in
order, then the columns in order), the Chan-Vese sums per column of each block of
CHAN_VESE_BLOCK_ROWS rows (added block after block, then the columns in order). Arithmetic is
IEEE float64 without contraction into FMAs, so the MorphACWE attachment equals NumPy's for
integer-valued images and the MorphGAC attachment for any float64 gimage.
"""

from __future__ import annotations

import functools

import numpy as np

from .disk_cache import cache_on_disk
from .targets import cpu_kernel, cpu_target

# Rows per task of the multi-threaded Chan-Vese step, each task with column sums of its own: the
# split, and so the order of the sums, is fixed by the image, whatever the number of threads.
CHAN_VESE_BLOCK_ROWS = 16


def cpu_serial_kernel(fn):
    """Compile a kernel for one CPU thread (its ``prange`` runs as ``range``), cached on disk.

    Each pass of a level-set iteration is a few hundred microseconds of work at 512x512; measured
    on the 2-core machine of docs/benchmarks.md, waking a second thread for every pass cost more
    than it saved, and the ``parallel=True`` form of these loops ran 4x slower on one thread. The
    heaviest pass, the Chan-Vese step (then 1.8 ms at 512x512 on one thread, now 1.15 ms), took
    0.6-0.7 ms on two threads (its row blocks split between them) while the machine left a core
    free, but mostly 8 ms (two 4 ms scheduler ticks) at a load average of 2.5 to 4: the second
    thread waited for the core another process held (docs/benchmarks.md). It runs on Numba's
    threads all the same, like the package's other parallel CPU kernels (``cpu_kernel``), with
    the same bits for any thread count; the snakes' passes stay here.
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

    cpu_target()  # the package's CPU threading setup, before the first parallel kernel
    inline = numba.njit(inline="always", nogil=True)
    row_bounds = inline(_row_bounds)

    # --- curvature operators: SI = max over line elements of the erosion, IS = min of dilations.
    # A task is one padded plane (2-D: an image; 3-D: a z slice) walked as one flat row of
    # height * (width + 2) - 2 pixels, border columns included, so the vector loop runs long
    # (64-pixel rows left most of a 3-D row to the scalar remainder); the border columns it
    # wrote are zeroed after.

    @inline
    def zero_border_columns(plane, height, stride):
        for y in range(1, height + 1):
            plane[y * stride] = 0
            plane[y * stride + stride - 1] = 0

    @inline
    def flat_rows(plane, stride):
        """(up, mid, down): a flattened padded plane seen from rows y - 1, y, y + 1."""
        flat = plane.reshape(plane.size)
        return flat[:plane.size - 2 * stride], flat[stride:plane.size - stride], flat[2 * stride:]

    @cpu_serial_kernel
    def curvature_2d(src, dst, dilate):
        """SI (dilate False) or IS (dilate True) of each image."""
        batch, height, stride = src.shape[0], src.shape[1] - 2, src.shape[2]
        span = height * stride - 1
        for b in prange(batch):
            up, mid, down = flat_rows(src[b], stride)
            out = flat_rows(dst[b], stride)[1]
            if dilate:
                for x in range(1, span):
                    out[x] = mid[x] | ((up[x - 1] | down[x + 1]) & (up[x] | down[x]) & (up[x + 1] | down[x - 1])
                                       & (mid[x - 1] | mid[x + 1]))
            else:
                for x in range(1, span):
                    out[x] = mid[x] & ((up[x - 1] & down[x + 1]) | (up[x] & down[x]) | (up[x + 1] & down[x - 1])
                                       | (mid[x - 1] & mid[x + 1]))
            zero_border_columns(dst[b].reshape(dst[b].size), height, stride)

    # The 3-D elements are the 9 planes of 3x3 voxels through the centre; vABC is the voxel at
    # offset (A - 1, B - 1, C - 1) in (z, y, x), the centre v111 belongs to every plane.

    @cpu_serial_kernel
    def curvature_3d(src, dst, dilate):
        """SI (dilate False) or IS (dilate True): every plane contains the centre r11[x], so
        SI = centre & (any plane's other 8 all set), IS = centre | (every plane has one set)."""
        batch, depth, height, stride = src.shape[0], src.shape[1] - 2, src.shape[2] - 2, src.shape[3]
        span = height * stride - 1
        for task in prange(batch * depth):
            b, z = row_bounds(task, depth)
            r00, r01, r02 = flat_rows(src[b, z], stride)
            r10, r11, r12 = flat_rows(src[b, z + 1], stride)
            r20, r21, r22 = flat_rows(src[b, z + 2], stride)
            out = flat_rows(dst[b, z + 1], stride)[1]
            for x in range(1, span):
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
            zero_border_columns(dst[b, z + 1].reshape(dst[b, z + 1].size), height, stride)

    @inline
    def rows_3d(src, b, z, y):
        """The 9 rows around voxel row (z, y) of image b (padded coordinates of the centre - 1)."""
        return (src[b, z, y], src[b, z, y + 1], src[b, z, y + 2],
                src[b, z + 1, y], src[b, z + 1, y + 1], src[b, z + 1, y + 2],
                src[b, z + 2, y], src[b, z + 2, y + 1], src[b, z + 2, y + 2])

    # --- rows walked along x: the first and last pixel (np.gradient's one-sided ends, Chan-Vese's
    # replicated edge) are handled outside the loop so that it has no branch and vectorises. The
    # snakes' loops run over the whole row with the interior formula (reading the zero border)
    # and then rewrite the two ends: a trip count of the row width, a multiple of the vector step
    # for the usual widths, leaves no scalar remainder (a 64-pixel row lost a quarter of its
    # pixels to it). Per-pixel helpers return their value and the kernel's own loop stores it
    # (with the store, or the loop, inside an inlined helper the pass ran 2-4x slower); updates
    # are bit selects, which vectorise, where a conditional expression did not.

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
    def unit(flag):
        """A 0/1 flag as float64, converted from int32: the int64 conversion Numba makes of
        ``float(flag)`` has no AVX2 vector form and kept the row sums scalar."""
        return float(np.int32(flag))

    @inline
    def select_sign(aux, old):
        """1 where aux > 0, 0 where aux < 0, else (0 or NaN) old."""
        return np.uint8(aux > 0) | (np.uint8(not aux < 0) & old)

    # --- MorphACWE: the means, then the attachment fused with the gradient predicate

    @inline
    def acwe_add_row(level, values, sums):
        """Add one row to the column sums: sums[0, x] += I (1 - u), sums[1, x] += I u,
        sums[2, x] += u. Column by column is an element-wise loop, which vectorises; the sums along
        a row did not (their order is fixed, so LLVM may not reorder them into vector lanes)."""
        outside, inside, count = sums[0], sums[1], sums[2]
        for x in range(values.shape[0]):
            flag = unit(level[x + 1])
            outside[x] += values[x] * (1.0 - flag)
            inside[x] += values[x] * flag
            count[x] += flag

    @inline
    def acwe_store_means(sums, pixels, means, b):
        """means[b] = (c0, c1) from the column sums, added in column order. Counts are exact
        integers in float64; the image sums are exact in any order for integer-valued images."""
        s0 = s1 = n1 = 0.0
        for x in range(sums.shape[1]):
            s0 += sums[0, x]
            s1 += sums[1, x]
            n1 += sums[2, x]
        means[b, 0] = s0 / ((pixels - n1) + 1e-8)
        means[b, 1] = s1 / (n1 + 1e-8)

    @cpu_serial_kernel
    def acwe_means_2d(u, image, means):
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        sums = np.empty((3, width))
        for b in range(batch):
            sums[:] = 0.0
            for y in range(height):
                acwe_add_row(u[b, y + 1], image[b, y], sums)
            acwe_store_means(sums, float(height * width), means, b)

    @cpu_serial_kernel
    def acwe_means_3d(u, image, means):
        batch, depth, height, width = image.shape[0], image.shape[1], image.shape[2], image.shape[3]
        sums = np.empty((3, width))
        for b in range(batch):
            sums[:] = 0.0
            for z in range(depth):
                for y in range(height):
                    acwe_add_row(u[b, z + 1, y + 1], image[b, z, y], sums)
            acwe_store_means(sums, float(depth * height * width), means, b)

    @inline
    def acwe_pixel(mid, up, down, hy, front, back, hz, value, x, x0, x1, hx, c0, c1, lambda1, lambda2):
        """The attachment at image column x (x0, x1: its neighbours along x). |np.gradient(u)|
        along an axis is 0 or 1 / the distance (0.5 or 1): hz, hy, hx are those inverses in
        halves (1 or 2), so the sum of the |slopes| is counted exactly in int32 and converted
        once. In 2-D front and back are mid and add nothing."""
        halves = (np.int32(front[x + 1] ^ back[x + 1]) * hz + np.int32(up[x + 1] ^ down[x + 1]) * hy
                  + np.int32(mid[x0 + 1] ^ mid[x1 + 1]) * hx)
        abs_du = 0.5 * float(np.int32(halves))
        aux = abs_du * (lambda1 * square(value - c1) - lambda2 * square(value - c0))
        return select_sign(-aux, mid[x + 1])

    @inline
    def halves(inverse):
        """1 / distance (0.5 or 1, from neighbours) counted in halves."""
        return np.int32(1) if inverse == 0.5 else np.int32(2)

    @cpu_serial_kernel
    def acwe_attach_2d(src, image, means, lambda1, lambda2, dst):
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        last = width - 1
        one, two = np.int32(1), np.int32(2)
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            y0, y1, dy = neighbours(y, height)
            hy = halves(dy)
            mid, up, down, out, values = src[b, y + 1], src[b, y0 + 1], src[b, y1 + 1], dst[b, y + 1], image[b, y]
            c0, c1 = means[b, 0], means[b, 1]
            for x in range(last + 1):
                out[x + 1] = acwe_pixel(mid, up, down, hy, mid, mid, one, values[x], x, x - 1, x + 1, one, c0, c1,
                                        lambda1, lambda2)
            out[1] = acwe_pixel(mid, up, down, hy, mid, mid, one, values[0], 0, 0, 1, two, c0, c1, lambda1, lambda2)
            out[last + 1] = acwe_pixel(mid, up, down, hy, mid, mid, one, values[last], last, last - 1, last, two, c0,
                                       c1, lambda1, lambda2)

    @cpu_serial_kernel
    def acwe_attach_3d(src, image, means, lambda1, lambda2, dst):
        batch, depth, height, width = image.shape[0], image.shape[1], image.shape[2], image.shape[3]
        last = width - 1
        one, two = np.int32(1), np.int32(2)
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            z0, z1, dz = neighbours(z, depth)
            y0, y1, dy = neighbours(y, height)
            hz, hy = halves(dz), halves(dy)
            mid, front, back = src[b, z + 1, y + 1], src[b, z0 + 1, y + 1], src[b, z1 + 1, y + 1]
            up, down, out, values = src[b, z + 1, y0 + 1], src[b, z + 1, y1 + 1], dst[b, z + 1, y + 1], image[b, z, y]
            c0, c1 = means[b, 0], means[b, 1]
            for x in range(last + 1):
                out[x + 1] = acwe_pixel(mid, up, down, hy, front, back, hz, values[x], x, x - 1, x + 1, one, c0, c1,
                                        lambda1, lambda2)
            out[1] = acwe_pixel(mid, up, down, hy, front, back, hz, values[0], 0, 0, 1, two, c0, c1, lambda1, lambda2)
            out[last + 1] = acwe_pixel(mid, up, down, hy, front, back, hz, values[last], last, last - 1, last, two, c0,
                                       c1, lambda1, lambda2)

    # --- MorphGAC. The attachment's outcome at a pixel depends on gimage's gradient there (fixed
    # for the run) and on u only through the differences d_i in {-1, 0, 1} of u across the pixel
    # along each axis: aux = sum_i g_i * (d_i / distance_i). gac_plan evaluates that expression,
    # in the same operations and order, for every combination of the d_i once per run and keeps
    # per pixel one word of bits: whether aux > 0 and whether not aux < 0 (u kept) for each
    # combination, and the balloon's mask gimage > limit. gac_step then reads 4 (3-D: 8) bytes a
    # pixel instead of the gradient's 16 (24) and gimage's 8, and runs the balloon and the
    # attachment in one pass: the balloon's rows (3-D: planes) go to a ring of 3 that the
    # attachment reads, so the intermediate level set never goes to memory.

    @inline
    def gimage_slope(before, after, inverse):
        """np.gradient of gimage along one axis: (after - before) / distance (1 or 2; the
        product with the inverse is the same correctly rounded value)."""
        return (after - before) * inverse

    @inline
    def plan_word_2d(g_y, g_x, sy, sx, masked):
        word = np.uint32(masked) << np.uint32(18)
        for code in range(9):
            aux = g_y * (float(code // 3 - 1) * sy) + g_x * (float(code % 3 - 1) * sx)
            word |= (np.uint32(aux > 0) << np.uint32(code)) | (np.uint32(not aux < 0) << np.uint32(code + 9))
        return word

    @cpu_serial_kernel
    def gac_plan_2d(gimage, limit, plan):
        """plan[b, y, x] (uint32): bit c = 3 (d_y + 1) + d_x + 1 set where aux > 0, bit c + 9
        where not aux < 0, bit 18 where gimage > limit[b]."""
        batch, height, width = gimage.shape[0], gimage.shape[1], gimage.shape[2]
        last = width - 1
        for task in prange(batch * height):
            b, y = row_bounds(task, height)
            y0, y1, sy = neighbours(y, height)
            up, mid, down, bound, out = gimage[b, y0], gimage[b, y], gimage[b, y1], limit[b], plan[b, y]
            for x in range(1, last):
                out[x] = plan_word_2d(gimage_slope(up[x], down[x], sy), gimage_slope(mid[x - 1], mid[x + 1], 0.5), sy,
                                      0.5, mid[x] > bound)
            for x in (0, last):
                x0, x1, sx = neighbours(x, width)
                out[x] = plan_word_2d(gimage_slope(up[x], down[x], sy), gimage_slope(mid[x0], mid[x1], sx), sy, sx,
                                      mid[x] > bound)

    @inline
    def plan_pair_3d(g_z, g_y, g_x, sz, sy, sx, d_z, d_y, d_x):
        """The bits of code c (differences d) and of 26 - c (differences -d). Negating every
        difference negates aux exactly (each product and sum is rounded symmetrically; a 0
        difference gives g * 0.0 either way), so aux(-d) > 0 where aux(d) < 0 and NaN stays NaN."""
        aux = g_z * (float(d_z) * sz) + g_y * (float(d_y) * sy) + g_x * (float(d_x) * sx)
        code = 9 * (d_z + 1) + 3 * (d_y + 1) + d_x + 1
        positive, kept = np.uint64(aux > 0), np.uint64(not aux < 0)
        return ((positive << np.uint64(code)) | (kept << np.uint64(code + 27))
                | ((kept ^ np.uint64(1)) << np.uint64(26 - code)) | ((positive ^ np.uint64(1)) << np.uint64(53 - code)))

    @cpu_serial_kernel
    def gac_plan_3d(gimage, limit, plan):
        """plan[b, z, y, x] (uint64): bit c = 9 (d_z + 1) + 3 (d_y + 1) + d_x + 1 set where
        aux > 0, bit c + 27 where not aux < 0, bit 54 where gimage > limit[b]; aux is evaluated
        for the codes 0 to 13 and gives the codes 26 to 13 by symmetry."""
        batch, depth, height, width = gimage.shape[0], gimage.shape[1], gimage.shape[2], gimage.shape[3]
        for task in prange(batch * depth * height):
            b, zy = row_bounds(task, depth * height)
            z, y = zy // height, zy % height
            z0, z1, sz = neighbours(z, depth)
            y0, y1, sy = neighbours(y, height)
            for x in range(width):
                x0, x1, sx = neighbours(x, width)
                g_z = gimage_slope(gimage[b, z0, y, x], gimage[b, z1, y, x], sz)
                g_y = gimage_slope(gimage[b, z, y0, x], gimage[b, z, y1, x], sy)
                g_x = gimage_slope(gimage[b, z, y, x0], gimage[b, z, y, x1], sx)
                word = np.uint64(gimage[b, z, y, x] > limit[b]) << np.uint64(54)
                for d_y in range(-1, 2):
                    for d_x in range(-1, 2):
                        word |= plan_pair_3d(g_z, g_y, g_x, sz, sy, sx, -1, d_y, d_x)
                for d_x in range(-1, 2):
                    word |= plan_pair_3d(g_z, g_y, g_x, sz, sy, sx, 0, -1, d_x)
                word |= plan_pair_3d(g_z, g_y, g_x, sz, sy, sx, 0, 0, -1)
                word |= plan_pair_3d(g_z, g_y, g_x, sz, sy, sx, 0, 0, 0)
                plan[b, z, y, x] = word

    @inline
    def masked_select(mask_bit, new, old):
        return (new & mask_bit) | (old & (mask_bit ^ 1))

    @inline
    def balloon_row_2d(up, mid, down, words, grow, out):
        """One padded row of the balloon step: the 3x3 box dilation (grow) or erosion of the
        rows up, mid, down where the plan's mask bit is set, else mid."""
        if grow:
            for x in range(1, words.shape[0] + 1):
                box = (up[x - 1] | up[x] | up[x + 1] | mid[x - 1] | mid[x] | mid[x + 1] | down[x - 1] | down[x]
                       | down[x + 1])
                out[x] = masked_select(np.uint8((words[x - 1] >> np.uint32(18)) & np.uint32(1)), box, mid[x])
        else:
            for x in range(1, words.shape[0] + 1):
                box = (up[x - 1] & up[x] & up[x + 1] & mid[x - 1] & mid[x] & mid[x + 1] & down[x - 1] & down[x]
                       & down[x + 1])
                out[x] = masked_select(np.uint8((words[x - 1] >> np.uint32(18)) & np.uint32(1)), box, mid[x])

    @inline
    def planned_2d(mid, up, down, words, x, x0, x1):
        """u at x from its plan word. The code (0 to 8) is masked to 4 bits so that LLVM keeps the
        shifts in 32-bit lanes (8 a vector, twice as fast as the 64-bit lanes it used without)."""
        code = np.uint32(3 * (np.int32(down[x + 1]) - np.int32(up[x + 1])) + np.int32(mid[x1 + 1])
                         - np.int32(mid[x0 + 1]) + np.int32(4)) & np.uint32(15)
        word = words[x]
        return (np.uint8((word >> code) & np.uint32(1))
                | (np.uint8((word >> (code + np.uint32(9))) & np.uint32(1)) & mid[x + 1]))

    @cpu_serial_kernel
    def gac_step_2d(src, plan, balloon, dst):
        """One MorphGAC iteration before the smoothing: the balloon (balloon > 0: dilation, < 0:
        erosion, 0: none) where the plan's mask bit is set, then the attachment."""
        batch, height, width = plan.shape[0], plan.shape[1], plan.shape[2]
        last = width - 1
        ring = np.zeros((3, width + 2), np.uint8)
        for b in range(batch):
            u, words = src[b], plan[b]
            for y in range(height):
                y0, y1, _ = neighbours(y, height)
                if balloon:
                    for r in range(0 if y == 0 else y + 1, min(y + 2, height)):
                        balloon_row_2d(u[r], u[r + 1], u[r + 2], words[r], balloon > 0, ring[r % 3])
                    mid, up, down = ring[y % 3], ring[y0 % 3], ring[y1 % 3]
                else:
                    mid, up, down = u[y + 1], u[y0 + 1], u[y1 + 1]
                out, row_words = dst[b, y + 1], words[y]
                for x in range(last + 1):
                    out[x + 1] = planned_2d(mid, up, down, row_words, x, x - 1, x + 1)
                out[1] = planned_2d(mid, up, down, row_words, 0, 0, 1)
                out[last + 1] = planned_2d(mid, up, down, row_words, last, last - 1, last)

    @inline
    def balloon_plane_3d(src, b, z, words, grow, out):
        """Padded plane z + 1 of image b after the balloon step (the 3x3x3 box) into out."""
        height, width = words.shape[0], words.shape[1]
        for y in range(height):
            rows = rows_3d(src, b, z, y)
            row_words, mid, target = words[y], rows[4], out[y + 1]
            for x in range(1, width + 1):
                if grow:
                    box = np.uint8(0)
                    for row in rows:
                        box |= row[x - 1] | row[x] | row[x + 1]
                else:
                    box = np.uint8(1)
                    for row in rows:
                        box &= row[x - 1] & row[x] & row[x + 1]
                target[x] = masked_select(np.uint8((row_words[x - 1] >> np.uint64(54)) & np.uint64(1)), box, mid[x])

    @inline
    def planned_3d(mid, up, down, front, back, words, x, x0, x1):
        code = np.uint64(9 * (np.int32(back[x + 1]) - np.int32(front[x + 1]))
                         + 3 * (np.int32(down[x + 1]) - np.int32(up[x + 1])) + np.int32(mid[x1 + 1])
                         - np.int32(mid[x0 + 1]) + np.int32(13)) & np.uint64(31)
        word = words[x]
        return (np.uint8((word >> code) & np.uint64(1))
                | (np.uint8((word >> (code + np.uint64(27))) & np.uint64(1)) & mid[x + 1]))

    @cpu_serial_kernel
    def gac_step_3d(src, plan, balloon, dst):
        batch, depth, height, width = plan.shape[0], plan.shape[1], plan.shape[2], plan.shape[3]
        last = width - 1
        ring = np.zeros((3, height + 2, width + 2), np.uint8)
        for b in range(batch):
            for z in range(depth):
                z0, z1, _ = neighbours(z, depth)
                if balloon:
                    for r in range(0 if z == 0 else z + 1, min(z + 2, depth)):
                        balloon_plane_3d(src, b, r, plan[b, r], balloon > 0, ring[r % 3])
                    middle, before, after = ring[z % 3], ring[z0 % 3], ring[z1 % 3]
                else:
                    middle, before, after = src[b, z + 1], src[b, z0 + 1], src[b, z1 + 1]
                for y in range(height):
                    y0, y1, _ = neighbours(y, height)
                    mid, up, down = middle[y + 1], middle[y0 + 1], middle[y1 + 1]
                    front, back, out, row_words = before[y + 1], after[y + 1], dst[b, z + 1, y + 1], plan[b, z, y]
                    for x in range(last + 1):
                        out[x + 1] = planned_3d(mid, up, down, front, back, row_words, x, x - 1, x + 1)
                    out[1] = planned_3d(mid, up, down, front, back, row_words, 0, 0, 1)
                    out[last + 1] = planned_3d(mid, up, down, front, back, row_words, last, last - 1, last)

    # --- whole snake runs (no callback): every iteration of one image before the next, so that
    # image's arrays stay in the cache (a batch taken pass by pass streams through memory on every
    # pass, and ran slower per image than one image alone), and no call from Python per pass.

    @inline
    def single(batch, b):
        """Image b of a batch as a batch of one, typed C-contiguous (a slice b:b + 1 is typed
        with any layout, and the kernels compiled for it did not vectorise)."""
        return batch[b].reshape((1,) + batch.shape[1:])

    def smoothing_steps(curvature):
        @inline
        def smooth(u, spare, smoothing, phase):
            """``smoothing`` curvature steps on u (spare: scratch) from ``phase``; the new phase.
            Phase 0 is SI(IS(u)): IS is the curvature kernel with dilate True."""
            for _ in range(smoothing):
                curvature(u, spare, phase == 0)
                curvature(spare, u, phase != 0)
                phase = 1 - phase
            return phase

        return smooth

    def acwe_run_kernel(means_kernel, attach_kernel, curvature):
        smooth = smoothing_steps(curvature)

        @cpu_serial_kernel
        def acwe_run(u, spare, image, num_iter, smoothing, phase, lambda1, lambda2):
            means = np.empty((1, 2))
            for b in range(image.shape[0]):
                src, dst, values = single(u, b), single(spare, b), single(image, b)
                step = phase
                for _ in range(num_iter):
                    means_kernel(src, values, means)
                    attach_kernel(src, values, means, lambda1, lambda2, dst)
                    step = smooth(dst, src, smoothing, step)
                    src, dst = dst, src
                if num_iter % 2:
                    u[b] = spare[b]

        return acwe_run

    def gac_run_kernel(step_kernel, curvature):
        smooth = smoothing_steps(curvature)

        @cpu_serial_kernel
        def gac_run(u, spare, plan, balloon, num_iter, smoothing, phase):
            for b in range(plan.shape[0]):
                src, dst, words = single(u, b), single(spare, b), single(plan, b)
                step = phase
                for _ in range(num_iter):
                    step_kernel(src, words, balloon, dst)
                    step = smooth(dst, src, smoothing, step)
                    src, dst = dst, src
                if num_iter % 2:
                    u[b] = spare[b]

        return gac_run

    # --- Chan-Vese: one fused Jacobi step per iteration, with the next iteration's sums

    @inline
    def chan_vese_pixel(phi, up, down, x, x0, x1, value, c1, c2, mu, lambda1, lambda2, dt):
        """scikit-image's update (centre + dt d (mu K + force)) / (1 + mu dt d (k1 + k2 + k3 + k4)),
        d = 1 / q, q = 1 + centre^2, K = right k1 + left k2 + below k3 + above k4, k_i = 1 / s_i
        (s_i its square roots), with numerator and denominator multiplied by q s1 s2 s3 s4: k_i
        becomes the product of the other three s_j, and one division a pixel is left of
        scikit-image's six (the divider and the square root unit bound the step)."""
        centre, right, left = phi[x], phi[x1], phi[x0]
        below, above = down[x], up[x]
        dx_mid, dy_mid = (right - left) / 2.0, (below - above) / 2.0
        s1 = np.sqrt(1e-16 + square(right - centre) + square(dy_mid))
        s2 = np.sqrt(1e-16 + square(centre - left) + square(dy_mid))
        s3 = np.sqrt(1e-16 + square(dx_mid) + square(below - centre))
        s4 = np.sqrt(1e-16 + square(dx_mid) + square(centre - above))
        s12, s34 = s1 * s2, s3 * s4
        p1, p2, p3, p4 = s2 * s34, s1 * s34, s4 * s12, s3 * s12
        product = s12 * s34
        scale = (1.0 + square(centre)) * product
        curvature = right * p1 + left * p2 + below * p3 + above * p4
        force = -lambda1 * square(value - c1) + lambda2 * square(value - c2)
        return (centre * scale + dt * (mu * curvature + force * product)) / (scale + mu * dt * (p1 + p2 + p3 + p4))

    @inline
    def region_add_row(phi, previous, values, sums):
        """Add one row to the column sums: sums[0, x] += f H, sums[1, x] += H,
        sums[2, x] += f (1 - H), sums[3, x] += (phi - previous)^2, H = phi > 0 (element-wise
        along the row, so it vectorises, as acwe_add_row)."""
        s_in, n_in, s_out, change = sums[0], sums[1], sums[2], sums[3]
        for x in range(values.shape[0]):
            flag = unit(phi[x] > 0)
            s_in[x] += values[x] * flag
            n_in[x] += flag
            s_out[x] += values[x] * (1.0 - flag)
            change[x] += square(phi[x] - previous[x])

    @inline
    def chan_vese_store_stats(sums, pixels, stats, b):
        """stats[b] = (c1, c2, RMS change) from the column sums, added in column order."""
        s_in = n_in = s_out = change = 0.0
        for x in range(sums.shape[1]):
            s_in += sums[0, x]
            n_in += sums[1, x]
            s_out += sums[2, x]
            change += sums[3, x]
        n_out = pixels - n_in
        stats[b, 0] = s_in / n_in if n_in != 0 else s_in
        stats[b, 1] = s_out / n_out if n_out != 0 else s_out
        stats[b, 2] = np.sqrt(change / pixels)

    @cpu_serial_kernel
    def chan_vese_start(phi, image, stats):
        """stats[b] = (c1, c2, 0) of phi."""
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        sums = np.empty((4, width))
        for b in range(batch):
            sums[:] = 0.0
            for y in range(height):
                region_add_row(phi[b, y], phi[b, y], image[b, y], sums)
            chan_vese_store_stats(sums, float(height * width), stats, b)

    @inline
    def chan_vese_rows(phi, image, c1, c2, mu, lambda1, lambda2, dt, start, stop, new_phi, sums):
        """new_phi rows start to stop - 1 of one image, their column sums added to sums [4, W]."""
        height, last = image.shape[0], image.shape[1] - 1
        for y in range(start, stop):
            y0, y1, _ = neighbours(y, height)
            row, up, down, values, out = phi[y], phi[y0], phi[y1], image[y], new_phi[y]
            out[0] = chan_vese_pixel(row, up, down, 0, 0, min(1, last), values[0], c1, c2, mu, lambda1, lambda2, dt)
            for x in range(1, last):
                out[x] = chan_vese_pixel(row, up, down, x, x - 1, x + 1, values[x], c1, c2, mu, lambda1, lambda2, dt)
            if last > 0:
                out[last] = chan_vese_pixel(row, up, down, last, last - 1, last, values[last], c1, c2, mu, lambda1,
                                            lambda2, dt)
            region_add_row(out, row, values, sums)

    @inline
    def chan_vese_block_stats(sums, blocks, pixels, active, stats):
        """stats[b] from the column sums of image b's blocks [blocks, 4, W], added block after
        block."""
        for b in range(active.shape[0]):
            if active[b]:
                total = sums[b * blocks]
                for block in range(1, blocks):
                    total += sums[b * blocks + block]
                chan_vese_store_stats(total, pixels, stats, b)

    @cpu_kernel
    def chan_vese_step(phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi):
        """new_phi = one step of phi for the active images; stats[b] becomes (c1, c2, RMS
        change) of new_phi. A task, one per thread at a time, is a block of CHAN_VESE_BLOCK_ROWS
        rows with column sums of its own, added block after block: the bits do not depend on the
        number of threads."""
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        blocks = (height + CHAN_VESE_BLOCK_ROWS - 1) // CHAN_VESE_BLOCK_ROWS
        sums = np.empty((batch * blocks, 4, width))
        for task in prange(batch * blocks):
            b, block = row_bounds(task, blocks)
            if active[b]:
                start = block * CHAN_VESE_BLOCK_ROWS
                block_sums = sums[task]
                for x in range(width):
                    block_sums[0, x] = block_sums[1, x] = block_sums[2, x] = block_sums[3, x] = 0.0
                chan_vese_rows(phi[b], image[b], stats[b, 0], stats[b, 1], mu, lambda1, lambda2, dt, start,
                               min(start + CHAN_VESE_BLOCK_ROWS, height), new_phi[b], block_sums)
        chan_vese_block_stats(sums, blocks, float(height * width), active, stats)

    return dict(curvature_2d=curvature_2d, curvature_3d=curvature_3d,
                acwe_means_2d=acwe_means_2d, acwe_means_3d=acwe_means_3d,
                acwe_attach_2d=acwe_attach_2d, acwe_attach_3d=acwe_attach_3d,
                gac_plan_2d=gac_plan_2d, gac_plan_3d=gac_plan_3d, gac_step_2d=gac_step_2d, gac_step_3d=gac_step_3d,
                chan_vese_start=chan_vese_start, chan_vese_step=chan_vese_step,
                acwe_run_2d=acwe_run_kernel(acwe_means_2d, acwe_attach_2d, curvature_2d),
                acwe_run_3d=acwe_run_kernel(acwe_means_3d, acwe_attach_3d, curvature_3d),
                gac_run_2d=gac_run_kernel(gac_step_2d, curvature_2d),
                gac_run_3d=gac_run_kernel(gac_step_3d, curvature_3d))


class NumbaCpuLevelSetKernels:
    """Level-set kernels for NumPy arrays, one CPU thread per call (see cpu_serial_kernel) but
    the Chan-Vese step's, which splits its row blocks over Numba's threads.

    Level sets are uint8 ``[B, *(S + 2)]`` with a zero border, images float64 ``[B, *S]`` (see the
    module docstring); ``ndim`` below is the number of image axes (2 or 3).
    """

    xp = np

    @staticmethod
    def _pick(name, ndim):
        return _kernels()[f"{name}_{ndim}d"]

    def sup_inf(self, src, dst):
        self._pick("curvature", src.ndim - 1)(src, dst, False)

    def inf_sup(self, src, dst):
        self._pick("curvature", src.ndim - 1)(src, dst, True)

    def acwe_means(self, u, image, partial, means):
        """means [B, 2] float64 = (c0, c1) of each image. The sums run by columns in a scratch
        row of the kernel's own, so ``partial`` (the per-row scratch of the contract) is unused."""
        self._pick("acwe_means", image.ndim - 1)(u, image, means)

    def acwe_attach(self, src, image, means, lambda1, lambda2, dst):
        self._pick("acwe_attach", image.ndim - 1)(src, image, means, lambda1, lambda2, dst)

    def gac_plan(self, gimage, limit):
        """The per-run plan of gac_step: one word a pixel (uint32 in 2-D, uint64 in 3-D) holding
        the attachment's outcome for each neighbourhood of u (from np.gradient of gimage,
        computed inside) and the balloon's mask gimage > limit [B] (limit None: no balloon)."""
        ndim = gimage.ndim - 1
        plan = np.empty(gimage.shape, np.uint32 if ndim == 2 else np.uint64)
        limit = np.full(gimage.shape[0], np.inf) if limit is None else limit
        self._pick("gac_plan", ndim)(gimage, limit, plan)
        return plan

    def gac_step(self, src, plan, balloon, dst):
        """The balloon (balloon: 1 dilation, -1 erosion, 0 none) and the attachment in one pass."""
        self._pick("gac_step", plan.ndim - 1)(src, plan, balloon, dst)

    def acwe_run(self, u, spare, image, num_iter, smoothing, phase, lambda1, lambda2):
        """A whole MorphACWE run, one image after the other; the final level sets in u."""
        self._pick("acwe_run", image.ndim - 1)(u, spare, image, num_iter, smoothing, phase, lambda1, lambda2)

    def gac_run(self, u, spare, plan, balloon, num_iter, smoothing, phase):
        """A whole MorphGAC run from gac_plan's plan, one image after the other; the final level
        sets in u."""
        self._pick("gac_run", plan.ndim - 1)(u, spare, plan, balloon, num_iter, smoothing, phase)

    def chan_vese_start(self, phi, image, partial, stats):
        """stats [B, 3] = (c1, c2, 0) of phi. The sums run by columns in a scratch of the
        kernel's own, so ``partial`` (the per-row scratch of the contract) is unused."""
        _kernels()["chan_vese_start"](phi, image, stats)

    def chan_vese_step(self, phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi, partial):
        """new_phi = one step for the images where active [B] uint8 is set; stats becomes
        (c1, c2, RMS change) of new_phi for them (``partial`` unused, as in chan_vese_start)."""
        _kernels()["chan_vese_step"](phi, image, stats, mu, lambda1, lambda2, dt, active, new_phi)


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
        rows = int(np.prod(image.shape[1:-1]))  # every axis of an image but the last
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
