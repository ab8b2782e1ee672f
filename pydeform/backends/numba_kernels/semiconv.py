"""Semi-convolutional kernels for the Numba CPU (docs/semiconv.md); the kernel-set interface is
described in :mod:`pydeform.semiconv`.

Every kernel reads psi, or phi with the pixel coordinates added on the fly: the value of channel
d at pixel (y, x) is ``psi[d, y, x] + cy[d] * y + cx[d] * x`` with ``cy = (sy, 0, 0, ...)`` and
``cx = (0, sx, 0, ...)`` (all zero without coordinates), so no coordinate grid is materialised
and one code path serves both.

Segmented reductions (per-instance sums) use no one-hot mask and no atomics: one task per image
walks its pixels in a fixed order and owns that image's [K, D] accumulators, so the results
are bit-identical run to run and for every thread count, and the memory is O(N * K * D). Sums
are taken in float64. Kernels that write one value per pixel run one task per image row.

The loss's statistics and gradient cut each row into runs of one label and work run by run,
channel by channel (psi is [N, D, H, W]: a channel's run is contiguous): one loop per channel
keeps the run's differences psi_u - mean in a [D, run] buffer and adds their squares up per
pixel, one loop turns those into inverse norms, then one loop per channel adds the run's unit
vectors up, or writes its gradient, from the buffers (O(D * W) per task). Those loops
index with unsigned integers and read the column x from a float64 ramp, and their kernels are
compiled with ``reassoc`` and ``contract``, so they vectorise (SIMD) with the run's sums split
over vector lanes in an order the compiled code fixes: the bits still do not change from run
to run or with the number of threads. A run's sums reach the instance's accumulators once.

The CUDA kernels (:func:`cuda_kernels`) compute in the accumulation type, float32 for float32
and half-type embeddings (half types are read from float32 copies): their helpers take the
pixel coordinates as values of that type and make every constant from it, where the CPU
helpers' float64 literals would promote the arithmetic to float64. Their segmented reductions
run one thread per (image, instance) or per region over its pixels in order (deterministic,
no float atomics); votes are integer counts added with integer atomics (exact in any order).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..._arrays import accumulation_dtype
from ..._workspace import accumulator_plans, converted
from .targets import (
    bind_cuda, cpu_kernel, cpu_kernel_fast_sums, cpu_target, cuda_kernel, cuda_target, flat, launch_cuda,
)

LAPLACIAN, GAUSSIAN = 0, 1
ARGMAX, SOFTMAX = 0, 1


def _better_seed(score, best):
    """Whether ``score`` beats the seed score ``best`` found at a lower index: as NumPy's and
    PyTorch's argmax, NaN counts as the largest score and the first NaN wins. (Compiled as a
    device function of each target.)"""
    return score > best or (score != score and best == best)


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """The CPU kernels: ``(statistics, loss_grad, affinity, affinity_grad_psi,
    affinity_grad_centers, seeded, seeded_grad, votes, assign)``."""
    from numba import prange

    t = cpu_target()
    better_seed = t.device(_better_seed)

    @t.device
    def distance(psi, pixel, plane, dims, cy, cx, y, x, centers, c):
        """||psi_u - centers[c : c + dims]|| at flat ``pixel`` (image base included) = (y, x)."""
        total = 0.0
        for d in range(dims):
            diff = psi[pixel + d * plane] + cy[d] * y + cx[d] * x - centers[c + d]
            total += diff * diff
        return math.sqrt(total)

    @t.device
    def run_end(labels, line, x, width):
        """The end of the run of equal labels starting at ``x`` in the row starting at ``line``."""
        k = labels[line + x]
        end = x + 1
        while end < width and labels[line + end] == k:
            end += 1
        return end

    # The loops over a run below index with unsigned integers (no negative-index wraparound),
    # read one channel at a time, contiguously, and take the column x as a float64 from
    # ``columns`` (0, 1, ..., W - 1), where converting the integer would not vectorise: so the
    # CPU compiler turns them into SIMD.

    @t.device
    def column_ramp(width):
        """(0.0, 1.0, ..., width - 1) in a serial loop: an array expression here would be a
        parallel loop of its own, one more fork and join of the threads per call."""
        columns = np.empty(width)
        for x in range(width):
            columns[x] = x
        return columns

    @t.device
    def run_squares(psi, first, plane, dims, cy, cx, y, x, length, columns, means, mean, differences, squares):
        """differences[d * length + j] = psi_u - means[mean + d] and squares[j] = their squared
        norm over d for the pixels u = (y, x + j), j < length, of the row whose channel 0
        starts at flat ``first``."""
        for j in range(length):
            squares[np.uint64(j)] = 0.0
        for d in range(dims):
            base = np.uint64(first + d * plane + x)
            column = np.uint64(x)
            row = np.uint64(d * length)
            offset = cy[d] * y - means[mean + d]
            step = cx[d]
            for j in range(length):
                u = np.uint64(j)
                diff = psi[base + u] + (step * columns[column + u] + offset)
                differences[row + u] = diff
                squares[u] += diff * diff

    @t.device
    def invert_norms(squares, length):
        """squares[j] -> 1 / ||.|| for j < length (0 at the kink, NaN passes); returns the sum of
        the norms."""
        total = 0.0
        for j in range(length):
            norm = math.sqrt(squares[np.uint64(j)])
            total += norm
            squares[np.uint64(j)] = 1.0 / norm if norm != 0.0 else 0.0
        return total

    @cpu_kernel_fast_sums
    def statistics(psi, labels, cy, cx, sums, counts, norm_sums, unit_sums, batch, dims, height, width, k_max,
                   with_norms):
        """Per image: the per-instance sums of psi (``sums`` [N, K, D]) and pixel counts; with
        ``with_norms`` the sums are made means, then the sums of ||psi_u - mean|| (``norm_sums``
        [N, K]) and of the unit vectors (``unit_sums`` [N, K, D]) follow.

        Each row is cut into runs of one label; a run's sums are taken channel by channel over
        its pixels (vectorised: the kernel may reorder sums, and its fixed code gives the same
        bits every run) and reach the instance's accumulators once."""
        plane = height * width
        columns = column_ramp(width)
        for n in prange(batch):
            stats = n * k_max
            for k in range(k_max):
                counts[stats + k] = 0
                norm_sums[stats + k] = 0.0
                for d in range(dims):
                    sums[(stats + k) * dims + d] = 0.0
                    unit_sums[(stats + k) * dims + d] = 0.0
            for y in range(height):
                line = n * plane + y * width
                first = n * dims * plane + y * width
                x = 0
                while x < width:
                    end = run_end(labels, line, x, width)
                    k = labels[line + x]
                    if k >= 1 and k <= k_max:
                        counts[stats + k - 1] += end - x
                        for d in range(dims):
                            base = np.uint64(first + d * plane + x)
                            total = 0.0
                            for j in range(end - x):
                                total += psi[base + np.uint64(j)]
                            # The coordinates' sum over the run in closed form (integers: exact).
                            sums[(stats + k - 1) * dims + d] += total + (end - x) * (cy[d] * y
                                                                                     + cx[d] * (x + end - 1) * 0.5)
                    x = end
            if not with_norms:
                continue
            for k in range(k_max):
                if counts[stats + k] > 0:
                    for d in range(dims):
                        sums[(stats + k) * dims + d] /= counts[stats + k]
            inverses = np.empty(width)
            differences = np.empty(dims * width)
            for y in range(height):
                line = n * plane + y * width
                first = n * dims * plane + y * width
                x = 0
                while x < width:
                    end = run_end(labels, line, x, width)
                    k = labels[line + x]
                    if k >= 1 and k <= k_max:
                        mean = (stats + k - 1) * dims
                        run_squares(psi, first, plane, dims, cy, cx, y, x, end - x, columns, sums, mean, differences,
                                    inverses)
                        norm_sums[stats + k - 1] += invert_norms(inverses, end - x)
                        for d in range(dims):
                            row = np.uint64(d * (end - x))
                            total = 0.0
                            for j in range(end - x):
                                u = np.uint64(j)
                                total += differences[row + u] * inverses[u]
                            unit_sums[mean + d] += total
                    x = end

    @cpu_kernel_fast_sums
    def loss_grad(psi, labels, cy, cx, means, scales, mean_units, grad, batch, dims, height, width, k_max):
        """grad_u = scales[k] * (e_u - mean_units[k]) inside instance k, 0 elsewhere; per row,
        run by run, channel by channel (vectorised)."""
        plane = height * width
        columns = column_ramp(width)
        for row in prange(batch * height):
            n = row // height
            y = row - n * height
            line = n * plane + y * width
            first = n * dims * plane + y * width
            inverses = np.empty(width)
            differences = np.empty(dims * width)
            x = 0
            while x < width:
                end = run_end(labels, line, x, width)
                k = labels[line + x]
                if k < 1 or k > k_max:
                    for d in range(dims):
                        base = np.uint64(first + d * plane + x)
                        for j in range(end - x):
                            grad[base + np.uint64(j)] = 0.0
                else:
                    mean = (n * k_max + k - 1) * dims
                    run_squares(psi, first, plane, dims, cy, cx, y, x, end - x, columns, means, mean, differences,
                                inverses)
                    invert_norms(inverses, end - x)
                    scale = scales[n * k_max + k - 1]
                    for d in range(dims):
                        base = np.uint64(first + d * plane + x)
                        row = np.uint64(d * (end - x))
                        unit = mean_units[mean + d]
                        for j in range(end - x):
                            u = np.uint64(j)
                            grad[base + u] = scale * (differences[row + u] * inverses[u] - unit)
                x = end

    @cpu_kernel
    def affinity(psi, centers, sigma, cy, cx, out, batch, dims, height, width, k_max, kernel):
        plane = height * width
        for row in prange(batch * height):
            n = row // height
            y = row - n * height
            for k in range(k_max):
                s = sigma[n * k_max + k]
                for x in range(width):
                    dist = distance(psi, n * dims * plane + y * width + x, plane, dims, cy, cx, y, x, centers,
                                    (n * k_max + k) * dims)
                    if kernel == LAPLACIAN:
                        value = math.exp(-dist / s)
                    else:
                        value = math.exp(-(dist * dist) / (2.0 * s * s))
                    out[((n * k_max + k) * height + y) * width + x] = value

    @t.device
    def affinity_factor(g, psi, pixel, plane, dims, cy, cx, y, x, centers, c, s, kernel):
        """(f, dist) with d A / d psi_u = f * (psi_u - c) times the upstream gradient g."""
        dist = distance(psi, pixel, plane, dims, cy, cx, y, x, centers, c)
        if kernel == LAPLACIAN:
            a = math.exp(-dist / s)
            if dist == 0.0:
                return 0.0, dist, a
            return -g * a / (s * dist), dist, a
        a = math.exp(-(dist * dist) / (2.0 * s * s))
        return -g * a / (s * s), dist, a

    @cpu_kernel
    def affinity_grad_psi(grad_out, psi, centers, sigma, cy, cx, grad_psi, batch, dims, height, width, k_max,
                          kernel):
        """grad psi_u = sum over k (in order) of d A[k, u] / d psi_u."""
        plane = height * width
        for row in prange(batch * height):
            n = row // height
            y = row - n * height
            for x in range(width):
                pixel = n * dims * plane + y * width + x
                for d in range(dims):
                    grad_psi[pixel + d * plane] = 0.0
                for k in range(k_max):
                    c = (n * k_max + k) * dims
                    g = grad_out[((n * k_max + k) * height + y) * width + x]
                    f, _, _ = affinity_factor(g, psi, pixel, plane, dims, cy, cx, y, x, centers, c,
                                              sigma[n * k_max + k], kernel)
                    for d in range(dims):
                        grad_psi[pixel + d * plane] += f * (psi[pixel + d * plane] + cy[d] * y + cx[d] * x
                                                            - centers[c + d])

    @cpu_kernel
    def affinity_grad_centers(grad_out, psi, centers, sigma, cy, cx, grad_centers, grad_sigma, batch, dims,
                              height, width, k_max, kernel):
        """Per (image, center), over its pixels in order: the center's and sigma's gradients."""
        plane = height * width
        for task in prange(batch * k_max):
            n = task // k_max
            c = task * dims
            s = sigma[task]
            for d in range(dims):
                grad_centers[c + d] = 0.0
            total = 0.0
            for y in range(height):
                for x in range(width):
                    pixel = n * dims * plane + y * width + x
                    g = grad_out[(task * height + y) * width + x]
                    f, dist, a = affinity_factor(g, psi, pixel, plane, dims, cy, cx, y, x, centers, c, s, kernel)
                    for d in range(dims):
                        grad_centers[c + d] -= f * (psi[pixel + d * plane] + cy[d] * y + cx[d] * x - centers[c + d])
                    if kernel == LAPLACIAN:
                        total += g * a * dist / (s * s)
                    else:
                        total += g * a * dist * dist / (s * s * s)
            grad_sigma[task] = total

    @t.device
    def seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode):
        """Region r's seed into ``seeds[r]``; softmax weights into ``weights[r]`` (softmax mode)."""
        plane = height * width
        first = r * plane
        best = 0
        for p in range(1, plane):
            if better_seed(scores[first + p], scores[first + best]):
                best = p
        if mode == ARGMAX:
            y = best // width
            x = best - y * width
            for d in range(dims):
                seeds[r * dims + d] = psi[(r * dims + d) * plane + best] + cy[d] * y + cx[d] * x
            return
        top = scores[first + best]
        total = 0.0
        for p in range(plane):
            weights[first + p] = math.exp(scores[first + p] - top)
            total += weights[first + p]
        for p in range(plane):
            weights[first + p] /= total
        for d in range(dims):
            acc = 0.0
            for y in range(height):
                for x in range(width):
                    p = y * width + x
                    acc += weights[first + p] * (psi[(r * dims + d) * plane + p] + cy[d] * y + cx[d] * x)
            seeds[r * dims + d] = acc

    @cpu_kernel
    def seeded(scores, psi, sigma, cy, cx, seeds, weights, out, regions, dims, height, width, mode):
        plane = height * width
        for r in prange(regions):
            seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode)
            for y in range(height):
                for x in range(width):
                    p = r * plane + y * width + x
                    dist = distance(psi, r * dims * plane + y * width + x, plane, dims, cy, cx, y, x, seeds, r * dims)
                    out[p] = scores[p] - dist / sigma[r]

    @cpu_kernel
    def seeded_grad(grad_out, scores, psi, sigma, cy, cx, seeds, weights, grad_seeds, grad_scores, grad_psi,
                    grad_sigma, regions, dims, height, width, mode):
        """Per region: the direct gradients, then the seed's gradient sent back to psi (and,
        with softmax, to the scores) in pixel order."""
        plane = height * width
        for r in prange(regions):
            seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode)
            s = sigma[r]
            seed = r * dims
            for d in range(dims):
                grad_seeds[seed + d] = 0.0
            total = 0.0
            for y in range(height):
                for x in range(width):
                    p = r * plane + y * width + x
                    pixel = r * dims * plane + y * width + x
                    g = grad_out[p]
                    grad_scores[p] = g
                    dist = distance(psi, pixel, plane, dims, cy, cx, y, x, seeds, seed)
                    total += g * dist
                    for d in range(dims):
                        unit = 0.0
                        if dist != 0.0:
                            unit = (psi[pixel + d * plane] + cy[d] * y + cx[d] * x - seeds[seed + d]) / dist
                        grad_psi[pixel + d * plane] = -g * unit / s
                        grad_seeds[seed + d] += g * unit / s
            grad_sigma[r] = total / (s * s)
            if mode == ARGMAX:
                best = 0
                for p in range(1, plane):
                    if better_seed(scores[r * plane + p], scores[r * plane + best]):
                        best = p
                for d in range(dims):
                    grad_psi[(r * dims + d) * plane + best] += grad_seeds[seed + d]
                continue
            for y in range(height):
                for x in range(width):
                    p = y * width + x
                    w = weights[r * plane + p]
                    dot = 0.0
                    for d in range(dims):
                        pixel = (r * dims + d) * plane + p
                        grad_psi[pixel] += w * grad_seeds[seed + d]
                        dot += (psi[pixel] + cy[d] * y + cx[d] * x - seeds[seed + d]) * grad_seeds[seed + d]
                    grad_scores[r * plane + p] += w * dot

    @t.device
    def round_half_away(v):
        """v rounded half away from zero, exactly (floor(v + 0.5) would round the sum first: the
        float just below 0.5 would give 1); NaN and infinities as they are."""
        if math.isnan(v) or math.isinf(v):
            return v
        magnitude = abs(v)
        whole = math.floor(magnitude)
        if magnitude - whole >= 0.5:
            whole = math.ceil(magnitude)
        return whole if v >= 0 else -whole

    @cpu_kernel
    def votes(psi, foreground, cy, cx, counts, batch, dims, height, width, out_h, out_w):
        """One task per image adds its foreground pixels' votes (integers: any order is exact)."""
        plane = height * width
        for n in prange(batch):
            for i in range(out_h * out_w):
                counts[n * out_h * out_w + i] = 0
            for y in range(height):
                for x in range(width):
                    if not foreground[n * plane + y * width + x]:
                        continue
                    pixel = n * dims * plane + y * width + x
                    vy = round_half_away(psi[pixel] + cy[0] * y + cx[0] * x)
                    vx = round_half_away(psi[pixel + plane] + cy[1] * y + cx[1] * x)
                    if vy >= 0 and vy < out_h and vx >= 0 and vx < out_w:  # False for NaN
                        counts[(n * out_h + int(vy)) * out_w + int(vx)] += 1

    @cpu_kernel
    def assign(psi, foreground, centers, cy, cx, labels, batch, dims, height, width, k_max, max_distance):
        plane = height * width
        for row in prange(batch * height):
            n = row // height
            y = row - n * height
            for x in range(width):
                p = n * plane + y * width + x
                label = 0
                if foreground[p]:
                    best = math.inf
                    best_k = -1
                    for k in range(k_max):
                        dist = distance(psi, n * dims * plane + y * width + x, plane, dims, cy, cx, y, x, centers,
                                        (n * k_max + k) * dims)
                        if dist == dist and (best_k < 0 or dist < best):
                            best = dist
                            best_k = k
                    if best_k >= 0 and best <= max_distance:
                        label = best_k + 1
                labels[p] = label

    return statistics, loss_grad, affinity, affinity_grad_psi, affinity_grad_centers, seeded, seeded_grad, votes, \
        assign


# numba.cuda as a module global, bound by cuda_kernels() (see targets.bind_cuda).
cuda = None


@functools.lru_cache(maxsize=None)
def cuda_kernels():
    """The CUDA kernels, in the order of :func:`cpu_kernels`: grid-stride loops over pixels,
    output elements, (image, instance) pairs or regions. ``cy`` / ``cx`` are the coordinate
    factors in the accumulation type, which every constant is made from."""
    global cuda
    cuda = bind_cuda()
    # Only the target's device decorator is used: the kernels make every constant from the
    # dtype of ``cy`` (the accumulation type), so one build serves every dtype.
    t = cuda_target(np.float32)
    better_seed = t.device(_better_seed)

    @t.device
    def value_at(psi, pixel, plane, d, cy, cx, fy, fx):
        """Channel d of the pixel at flat ``pixel`` of channel 0, at (fy, fx) in the accumulation type."""
        return psi[pixel + d * plane] + cy[d] * fy + cx[d] * fx

    @t.device
    def distance(psi, pixel, plane, dims, cy, cx, fy, fx, centers, c):
        total = cy.dtype.type(0)
        for d in range(dims):
            diff = value_at(psi, pixel, plane, d, cy, cx, fy, fx) - centers[c + d]
            total += diff * diff
        return math.sqrt(total)

    @t.device
    def coordinates(cy, item, width):
        """(fy, fx) of flat pixel ``item`` of an image plane."""
        y = item // width
        return cy.dtype.type(y), cy.dtype.type(item - y * width)

    @t.device
    def affinity_factor(g, psi, pixel, plane, dims, cy, cx, fy, fx, centers, c, s, kernel):
        """(f, dist, a) with d A / d psi_u = f * (psi_u - c) for the upstream gradient g."""
        zero = cy.dtype.type(0)
        dist = distance(psi, pixel, plane, dims, cy, cx, fy, fx, centers, c)
        if kernel == LAPLACIAN:
            a = math.exp(-dist / s)
            if dist == zero:
                return zero, dist, a
            return -g * a / (s * dist), dist, a
        a = math.exp(-(dist * dist) / (s * s + s * s))
        return -g * a / (s * s), dist, a

    @t.device
    def seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode):
        """Region r's seed into ``seeds[r]`` (softmax weights into ``weights[r]``); its seed pixel."""
        plane = height * width
        first = r * plane
        best = 0
        for p in range(1, plane):
            if better_seed(scores[first + p], scores[first + best]):
                best = p
        base = r * dims * plane
        if mode == ARGMAX:
            fy, fx = coordinates(cy, best, width)
            for d in range(dims):
                seeds[r * dims + d] = value_at(psi, base + best, plane, d, cy, cx, fy, fx)
            return best
        top = scores[first + best]
        total = cy.dtype.type(0)
        for p in range(plane):
            weights[first + p] = math.exp(scores[first + p] - top)
            total += weights[first + p]
        for p in range(plane):
            weights[first + p] /= total
        for d in range(dims):
            acc = cy.dtype.type(0)
            for p in range(plane):
                fy, fx = coordinates(cy, p, width)
                acc += weights[first + p] * value_at(psi, base + p, plane, d, cy, cx, fy, fx)
            seeds[r * dims + d] = acc
        return best

    @cuda_kernel
    def statistics(psi, labels, cy, cx, sums, counts, norm_sums, unit_sums, batch, dims, height, width, k_max,
                   with_norms):
        plane = height * width
        zero = cy.dtype.type(0)
        for task in range(cuda.grid(1), batch * k_max, cuda.gridsize(1)):
            n = task // k_max
            k = task - n * k_max + 1
            count = 0
            for d in range(dims):
                sums[task * dims + d] = zero
                unit_sums[task * dims + d] = zero
            for p in range(plane):
                if labels[n * plane + p] != k:
                    continue
                count += 1
                fy, fx = coordinates(cy, p, width)
                for d in range(dims):
                    sums[task * dims + d] += value_at(psi, n * dims * plane + p, plane, d, cy, cx, fy, fx)
            counts[task] = count
            norm_sums[task] = zero
            if not with_norms:
                continue
            if count > 0:
                size = cy.dtype.type(count)
                for d in range(dims):
                    sums[task * dims + d] /= size
            for p in range(plane):
                if labels[n * plane + p] != k:
                    continue
                fy, fx = coordinates(cy, p, width)
                pixel = n * dims * plane + p
                norm = distance(psi, pixel, plane, dims, cy, cx, fy, fx, sums, task * dims)
                norm_sums[task] += norm
                if norm != zero:  # the unit vector is 0 at the kink (NaN passes)
                    inverse = cy.dtype.type(1) / norm
                    for d in range(dims):
                        diff = value_at(psi, pixel, plane, d, cy, cx, fy, fx) - sums[task * dims + d]
                        unit_sums[task * dims + d] += diff * inverse

    @cuda_kernel
    def loss_grad(psi, labels, cy, cx, means, scales, mean_units, grad, batch, dims, height, width, k_max):
        plane = height * width
        zero = cy.dtype.type(0)
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            n = item // plane
            p = item - n * plane
            k = labels[item]
            pixel = n * dims * plane + p
            if k < 1 or k > k_max:
                for d in range(dims):
                    grad[pixel + d * plane] = zero
                continue
            task = n * k_max + k - 1
            fy, fx = coordinates(cy, p, width)
            norm = distance(psi, pixel, plane, dims, cy, cx, fy, fx, means, task * dims)
            for d in range(dims):
                unit = zero
                if norm != zero:
                    unit = (value_at(psi, pixel, plane, d, cy, cx, fy, fx) - means[task * dims + d]) / norm
                grad[pixel + d * plane] = scales[task] * (unit - mean_units[task * dims + d])

    @cuda_kernel
    def affinity(psi, centers, sigma, cy, cx, out, batch, dims, height, width, k_max, kernel):
        plane = height * width
        for item in range(cuda.grid(1), batch * k_max * plane, cuda.gridsize(1)):
            task = item // plane
            n = task // k_max
            p = item - task * plane
            fy, fx = coordinates(cy, p, width)
            dist = distance(psi, n * dims * plane + p, plane, dims, cy, cx, fy, fx, centers, task * dims)
            s = sigma[task]
            if kernel == LAPLACIAN:
                out[item] = math.exp(-dist / s)
            else:
                out[item] = math.exp(-(dist * dist) / (s * s + s * s))

    @cuda_kernel
    def affinity_grad_psi(grad_out, psi, centers, sigma, cy, cx, grad_psi, batch, dims, height, width, k_max,
                          kernel):
        plane = height * width
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            n = item // plane
            p = item - n * plane
            pixel = n * dims * plane + p
            fy, fx = coordinates(cy, p, width)
            for d in range(dims):
                grad_psi[pixel + d * plane] = cy.dtype.type(0)
            for k in range(k_max):
                task = n * k_max + k
                f, _, _ = affinity_factor(grad_out[task * plane + p], psi, pixel, plane, dims, cy, cx, fy, fx,
                                          centers, task * dims, sigma[task], kernel)
                for d in range(dims):
                    grad_psi[pixel + d * plane] += f * (value_at(psi, pixel, plane, d, cy, cx, fy, fx)
                                                        - centers[task * dims + d])

    @cuda_kernel
    def affinity_grad_centers(grad_out, psi, centers, sigma, cy, cx, grad_centers, grad_sigma, batch, dims,
                              height, width, k_max, kernel):
        plane = height * width
        for task in range(cuda.grid(1), batch * k_max, cuda.gridsize(1)):
            n = task // k_max
            c = task * dims
            s = sigma[task]
            for d in range(dims):
                grad_centers[c + d] = cy.dtype.type(0)
            total = cy.dtype.type(0)
            for p in range(plane):
                pixel = n * dims * plane + p
                fy, fx = coordinates(cy, p, width)
                g = grad_out[task * plane + p]
                f, dist, a = affinity_factor(g, psi, pixel, plane, dims, cy, cx, fy, fx, centers, c, s, kernel)
                for d in range(dims):
                    grad_centers[c + d] -= f * (value_at(psi, pixel, plane, d, cy, cx, fy, fx) - centers[c + d])
                if kernel == LAPLACIAN:
                    total += g * a * dist / (s * s)
                else:
                    total += g * a * dist * dist / (s * s * s)
            grad_sigma[task] = total

    @cuda_kernel
    def seeded(scores, psi, sigma, cy, cx, seeds, weights, out, regions, dims, height, width, mode):
        plane = height * width
        for r in range(cuda.grid(1), regions, cuda.gridsize(1)):
            seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode)
            for p in range(plane):
                fy, fx = coordinates(cy, p, width)
                dist = distance(psi, r * dims * plane + p, plane, dims, cy, cx, fy, fx, seeds, r * dims)
                out[r * plane + p] = scores[r * plane + p] - dist / sigma[r]

    @cuda_kernel
    def seeded_grad(grad_out, scores, psi, sigma, cy, cx, seeds, weights, grad_seeds, grad_scores, grad_psi,
                    grad_sigma, regions, dims, height, width, mode):
        plane = height * width
        zero = cy.dtype.type(0)
        for r in range(cuda.grid(1), regions, cuda.gridsize(1)):
            best = seed_of(scores, psi, seeds, weights, r, dims, height, width, cy, cx, mode)
            s = sigma[r]
            seed = r * dims
            for d in range(dims):
                grad_seeds[seed + d] = zero
            total = zero
            for p in range(plane):
                pixel = r * dims * plane + p
                fy, fx = coordinates(cy, p, width)
                g = grad_out[r * plane + p]
                grad_scores[r * plane + p] = g
                dist = distance(psi, pixel, plane, dims, cy, cx, fy, fx, seeds, seed)
                total += g * dist
                for d in range(dims):
                    unit = zero
                    if dist != zero:
                        unit = (value_at(psi, pixel, plane, d, cy, cx, fy, fx) - seeds[seed + d]) / dist
                    grad_psi[pixel + d * plane] = -g * unit / s
                    grad_seeds[seed + d] += g * unit / s
            grad_sigma[r] = total / (s * s)
            if mode == ARGMAX:
                for d in range(dims):
                    grad_psi[(r * dims + d) * plane + best] += grad_seeds[seed + d]
                continue
            for p in range(plane):
                fy, fx = coordinates(cy, p, width)
                w = weights[r * plane + p]
                dot = zero
                for d in range(dims):
                    pixel = (r * dims + d) * plane + p
                    grad_psi[pixel] += w * grad_seeds[seed + d]
                    dot += (value_at(psi, r * dims * plane + p, plane, d, cy, cx, fy, fx) - seeds[seed + d]) \
                        * grad_seeds[seed + d]
                grad_scores[r * plane + p] += w * dot

    @t.device
    def round_half_away(v, zero, half):
        """As the CPU's, in v's type (NaN and infinities never reach math.floor, which the
        simulator computes as a Python int)."""
        if math.isnan(v) or math.isinf(v):
            return v
        magnitude = abs(v)
        whole = math.floor(magnitude)
        if magnitude - whole >= half:
            whole = math.ceil(magnitude)
        return whole if v >= zero else -whole

    @cuda_kernel
    def votes(psi, foreground, cy, cx, counts, batch, dims, height, width, out_h, out_w):
        plane = height * width
        zero, half = cy.dtype.type(0), cy.dtype.type(0.5)
        # The bounds in the arithmetic type: comparing the rounded vote with an integer would
        # convert both to float64.
        top_y, top_x = cy.dtype.type(out_h), cy.dtype.type(out_w)
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            if not foreground[item]:
                continue
            n = item // plane
            p = item - n * plane
            pixel = n * dims * plane + p
            fy, fx = coordinates(cy, p, width)
            vy = round_half_away(value_at(psi, pixel, plane, 0, cy, cx, fy, fx), zero, half)
            vx = round_half_away(value_at(psi, pixel, plane, 1, cy, cx, fy, fx), zero, half)
            if vy >= zero and vy < top_y and vx >= zero and vx < top_x:  # False for NaN
                cuda.atomic.add(counts, (n * out_h + int(vy)) * out_w + int(vx), 1)

    @cuda_kernel
    def assign(psi, foreground, centers, cy, cx, labels, batch, dims, height, width, k_max, max_distance):
        plane = height * width
        for item in range(cuda.grid(1), batch * plane, cuda.gridsize(1)):
            n = item // plane
            p = item - n * plane
            label = 0
            if foreground[item]:
                fy, fx = coordinates(cy, p, width)
                best = max_distance
                best_k = -1
                for k in range(k_max):
                    dist = distance(psi, n * dims * plane + p, plane, dims, cy, cx, fy, fx, centers,
                                    (n * k_max + k) * dims)
                    if dist == dist and (best_k < 0 or dist < best):
                        best = dist
                        best_k = k
                if best_k >= 0 and best <= max_distance:
                    label = best_k + 1
            labels[item] = label

    return statistics, loss_grad, affinity, affinity_grad_psi, affinity_grad_centers, seeded, seeded_grad, votes, \
        assign


class NumbaCpuSemiConvKernels:
    """The semi-convolutional kernel set for NumPy arrays, parallel with ``numba.prange``.
    ``offsets`` is the pair (cy, cx) of float64 [D] coordinate factors (see the module doc);
    per-instance statistics are float64; every output element is written."""

    xp = np

    @staticmethod
    def statistics_dtype(dtype):
        """dtype of the per-instance statistics, sigma and seeds for embeddings of ``dtype``."""
        return np.dtype(np.float64)

    @staticmethod
    def workspace(op, shapes, dtype, *, backward):
        """No scratch of their own (float32 and float64 only)."""
        return {}

    @staticmethod
    def statistics(psi, labels, offsets, sums, counts, norm_sums, unit_sums, *, with_norms):
        """Fill ``sums`` [N, K, D] and ``counts`` [N, K] int64 with each instance's sum of psi and
        pixel count; with ``with_norms`` turn ``sums`` into the means (0 for empty instances) and
        fill ``norm_sums`` [N, K] and ``unit_sums`` [N, K, D] (sums of ||psi_u - mean|| and of
        the unit vectors over each instance)."""
        batch, dims, height, width = psi.shape
        arrays = (psi, labels, *offsets, sums, counts, norm_sums, unit_sums)
        cpu_kernels()[0](*map(flat, arrays), batch, dims, height, width, counts.shape[1], with_norms)

    @staticmethod
    def loss_grad(psi, labels, offsets, means, scales, mean_units, grad):
        """grad [N, D, H, W] = scales[k] * (e_u - mean_units[k]) inside instance k, else 0."""
        batch, dims, height, width = psi.shape
        arrays = (psi, labels, *offsets, means, scales, mean_units, grad)
        cpu_kernels()[1](*map(flat, arrays), batch, dims, height, width, scales.shape[1])

    @staticmethod
    def affinity(psi, centers, sigma, offsets, out, kernel):
        """out [N, K, H, W]; sigma float64 [N, K]; kernel LAPLACIAN or GAUSSIAN."""
        batch, dims, height, width = psi.shape
        arrays = (psi, centers, sigma, *offsets, out)
        cpu_kernels()[2](*map(flat, arrays), batch, dims, height, width, centers.shape[1], kernel)

    @staticmethod
    def affinity_grad(grad_output, psi, centers, sigma, offsets, grad_psi, grad_centers, grad_sigma, kernel):
        """grad_psi [N, D, H, W], grad_centers [N, K, D], grad_sigma float64 [N, K]."""
        batch, dims, height, width = psi.shape
        shape = (batch, dims, height, width, centers.shape[1], kernel)
        inputs = tuple(map(flat, (grad_output, psi, centers, sigma, *offsets)))
        cpu_kernels()[3](*inputs, flat(grad_psi), *shape)
        cpu_kernels()[4](*inputs, flat(grad_centers), flat(grad_sigma), *shape)

    @staticmethod
    def seeded(scores, psi, sigma, offsets, seeds, weights, out, mode):
        """out [R, h, w]; sigma float64 [R]; seeds float64 [R, D] and weights float64 [R, h, w]
        scratch; mode ARGMAX or SOFTMAX."""
        regions, dims, height, width = psi.shape
        arrays = (scores, psi, sigma, *offsets, seeds, weights, out)
        cpu_kernels()[5](*map(flat, arrays), regions, dims, height, width, mode)

    @staticmethod
    def seeded_grad(grad_output, scores, psi, sigma, offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                    grad_sigma, mode):
        """grad_scores [R, h, w], grad_psi [R, D, h, w], grad_sigma float64 [R]; seeds,
        grad_seeds float64 [R, D] and weights float64 [R, h, w] scratch."""
        regions, dims, height, width = psi.shape
        arrays = (grad_output, scores, psi, sigma, *offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                  grad_sigma)
        cpu_kernels()[6](*map(flat, arrays), regions, dims, height, width, mode)

    @staticmethod
    def votes(psi, foreground, offsets, counts):
        """counts int32 [N, H', W'] from channels 0 and 1 of psi at the foreground pixels."""
        batch, dims, height, width = psi.shape
        arrays = (psi, foreground, *offsets, counts)
        cpu_kernels()[7](*map(flat, arrays), batch, dims, height, width, counts.shape[1], counts.shape[2])

    @staticmethod
    def assign(psi, foreground, centers, offsets, labels, max_distance):
        """labels int32 [N, H, W] of the nearest center within ``max_distance`` (0 if none)."""
        batch, dims, height, width = psi.shape
        arrays = (psi, foreground, centers, *offsets, labels)
        cpu_kernels()[8](*map(flat, arrays), batch, dims, height, width, centers.shape[1], max_distance)


# The arrays the Numba CUDA kernel set converts to float32 (half types) for each driver, by
# (forward, backward).
CUDA_COPIES = {
    "instance_means": (("psi",), ()),
    "instance_mean_loss": (("psi",), ("psi", "grad_psi")),
    "affinity": (("psi", "centers", "output"), ("grad_output", "psi", "centers", "grad_psi", "grad_centers")),
    "seeded_mask_logits": (("scores", "psi", "output"), ("grad_output", "scores", "psi", "grad_scores", "grad_psi")),
    "hough_votes": (("psi",), ()),
    "assign_to_centers": (("psi", "centers"), ()),
}


class NumbaCudaSemiConvKernels:
    """The semi-convolutional kernels compiled with ``numba.cuda.jit`` for CuPy arrays; the
    interface of :class:`NumbaCpuSemiConvKernels`. float16 / bfloat16 arrays are read from
    float32 copies and half-type outputs written back from float32 ones, so the arithmetic is
    float32 (float64 for float64). Labels are read as int64. With ``xp=numpy`` the kernels run
    on host arrays under the CUDA simulator."""

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    @staticmethod
    def statistics_dtype(dtype):
        return accumulation_dtype(dtype)

    @staticmethod
    def workspace(op, shapes, dtype, *, backward):
        """The float32 copies of the arrays the methods that the driver of ``op`` calls read and
        write, for half types (``shapes``: {name: shape} of the arguments and outputs; a gradient
        has its argument's shape, grad_output the output's); nothing otherwise."""
        copies = CUDA_COPIES[op][backward]
        sizes = {**shapes, **{f"grad_{name}": shape for name, shape in shapes.items()},
                 "grad_output": shapes.get("output")}
        return accumulator_plans({name: sizes[name] for name in copies}, dtype)

    def _run(self, index, n_items, *args):
        launch_cuda(cuda_kernels()[index], n_items, self.xp, *args)

    def _inputs(self, like, offsets, **arrays):
        """Flat arrays in the accumulation type of ``like``'s dtype: the coordinate factors, then
        ``arrays``."""
        acc = accumulation_dtype(like.dtype)
        factors = [self.xp.asarray(np.asarray(offset, acc)) for offset in offsets]
        return [*factors, *(flat(converted(self.xp, slot, array)) for slot, array in arrays.items())]

    def _outputs(self, **arrays):
        """(flat accumulation-type views or copies to compute into, a function writing them back)."""
        computed = {slot: converted(self.xp, slot, array) for slot, array in arrays.items()}

        def write_back():
            for slot, array in arrays.items():
                if computed[slot] is not array:
                    array[...] = computed[slot]

        return [flat(array) for array in computed.values()], write_back

    def _labels(self, labels):
        return flat(self.xp.ascontiguousarray(labels, dtype=np.int64))

    def statistics(self, psi, labels, offsets, sums, counts, norm_sums, unit_sums, *, with_norms):
        batch, dims, height, width = psi.shape
        cy, cx, psi_acc = self._inputs(psi, offsets, psi=psi)
        self._run(0, counts.size, psi_acc, self._labels(labels), cy, cx, *map(flat, (sums, counts, norm_sums,
                                                                                   unit_sums)),
                  batch, dims, height, width, counts.shape[1], bool(with_norms))

    def loss_grad(self, psi, labels, offsets, means, scales, mean_units, grad):
        batch, dims, height, width = psi.shape
        cy, cx, psi_acc = self._inputs(psi, offsets, psi=psi)
        (grad_acc,), write_back = self._outputs(grad_psi=grad)
        self._run(1, labels.size, psi_acc, self._labels(labels), cy, cx, flat(means), flat(scales), flat(mean_units),
                  grad_acc, batch, dims, height, width, scales.shape[1])
        write_back()

    def affinity(self, psi, centers, sigma, offsets, out, kernel):
        batch, dims, height, width = psi.shape
        cy, cx, psi_acc, centers_acc = self._inputs(psi, offsets, psi=psi, centers=centers)
        (out_acc,), write_back = self._outputs(output=out)
        self._run(2, out.size, psi_acc, centers_acc, flat(sigma), cy, cx, out_acc, batch, dims, height, width,
                  centers.shape[1], kernel)
        write_back()

    def affinity_grad(self, grad_output, psi, centers, sigma, offsets, grad_psi, grad_centers, grad_sigma, kernel):
        batch, dims, height, width = psi.shape
        cy, cx, grad_acc, psi_acc, centers_acc = self._inputs(psi, offsets, grad_output=grad_output, psi=psi,
                                                              centers=centers)
        (grad_psi_acc, grad_centers_acc), write_back = self._outputs(grad_psi=grad_psi, grad_centers=grad_centers)
        shape = (batch, dims, height, width, centers.shape[1], kernel)
        self._run(3, batch * height * width, grad_acc, psi_acc, centers_acc, flat(sigma), cy, cx, grad_psi_acc, *shape)
        self._run(4, sigma.size, grad_acc, psi_acc, centers_acc, flat(sigma), cy, cx, grad_centers_acc,
                  flat(grad_sigma), *shape)
        write_back()

    def seeded(self, scores, psi, sigma, offsets, seeds, weights, out, mode):
        regions, dims, height, width = psi.shape
        cy, cx, scores_acc, psi_acc = self._inputs(psi, offsets, scores=scores, psi=psi)
        (out_acc,), write_back = self._outputs(output=out)
        self._run(5, regions, scores_acc, psi_acc, flat(sigma), cy, cx, flat(seeds), flat(weights), out_acc, regions,
                  dims, height, width, mode)
        write_back()

    def seeded_grad(self, grad_output, scores, psi, sigma, offsets, seeds, weights, grad_seeds, grad_scores, grad_psi,
                    grad_sigma, mode):
        regions, dims, height, width = psi.shape
        cy, cx, grad_acc, scores_acc, psi_acc = self._inputs(psi, offsets, grad_output=grad_output, scores=scores,
                                                             psi=psi)
        (grad_scores_acc, grad_psi_acc), write_back = self._outputs(grad_scores=grad_scores, grad_psi=grad_psi)
        self._run(6, regions, grad_acc, scores_acc, psi_acc, flat(sigma), cy, cx, flat(seeds), flat(weights),
                  flat(grad_seeds), grad_scores_acc, grad_psi_acc, flat(grad_sigma), regions, dims, height, width, mode)
        write_back()

    def votes(self, psi, foreground, offsets, counts):
        batch, dims, height, width = psi.shape
        cy, cx, psi_acc = self._inputs(psi, offsets, psi=psi)
        counts.fill(0)
        self._run(7, foreground.size, psi_acc, flat(foreground), cy, cx, flat(counts), batch, dims, height, width,
                  counts.shape[1], counts.shape[2])

    def assign(self, psi, foreground, centers, offsets, labels, max_distance):
        batch, dims, height, width = psi.shape
        cy, cx, psi_acc, centers_acc = self._inputs(psi, offsets, psi=psi, centers=centers)
        self._run(8, labels.size, psi_acc, flat(foreground), centers_acc, cy, cx, flat(labels), batch, dims, height,
                  width, centers.shape[1], accumulation_dtype(psi.dtype).type(max_distance))
