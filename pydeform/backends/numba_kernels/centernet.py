"""CenterNet kernels for Numba (decode, targets, focal loss): the arithmetic of one pixel, one
object, one heap step written once, compiled for the CPU and for CUDA. Semantics are those
of docs/centernet.md; the kernel-set interface is described in :mod:`pydeform.centernet`.

Decode, in two passes over flat scores (index ``i = c*H*W + y*W + x`` within an image):

1. One task per chunk of consecutive indices of an image (:data:`CPU_CHUNK`; on CUDA see
   :func:`cuda_chunk`) reads each heat value and its window once (the peak test), keeping the
   chunk's best ``min(K, chunk)`` (score, index) candidates in a bounded heap in scratch. "Better"
   is a strict total order: higher score, then lower index; the heap's root is its worst entry,
   so a candidate costs one comparison unless it enters, and once the heap is full a pixel
   whose value (and 0) cannot beat the root skips the peak test altogether: with sigmoid
   heatmaps that is nearly every pixel (the CPU decode at the shape of docs/benchmarks.md ran 4x faster).
2. One task per image merges its chunks' candidates into one heap of ``min(K, C*H*W)``
   entries, heap-sorts it best first, gathers wh / reg and writes the detections (empty slots
   past C*H*W). Every score is a candidate, so the K best of an image are among the candidates
   (each of them is among the best of its own chunk): the result is exactly the top-K.

The heatmap is read once and never sorted or copied. On the CPU both passes are ``prange``
loops (two kernels: one parallel loop each); on CUDA they are the two launches.

Targets: each object's geometry (clipped box, radius, centre) and its Gaussian are computed by
one function; the CPU runs one task per heatmap plane (image, class), which draws the objects of
that class in slot order (a plain max, no other task writes the plane); CUDA runs one thread per
object with atomic max. The element-wise max makes both independent of order.

Focal loss: each task sums a fixed chunk of pixels, a second pass adds the chunk partials in
order (deterministic for any thread count); the gradient is element-wise.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..._arrays import accumulation_dtype
from ..._workspace import accumulator_plans, converted_arrays, scratch
from .targets import bind_cuda, cpu_kernel, cpu_target, cuda_kernel, cuda_target, flat, launch_cuda, typed_floats

# Flat scores per CPU decode task (pass 1); its heap of K candidates stays in cache.
CPU_CHUNK = 16384
# The smallest CUDA decode chunk.
MIN_CUDA_CHUNK = 256
# Pixels per focal-loss partial sum.
FOCAL_CHUNK = 8192
# Scratch slot of the focal loss's partial sums [3 * chunks].
FOCAL_PARTIALS_SLOT = "centernet_focal_partials"
# The float64 eps below which the original code zeroes Gaussian entries (relative to the peak 1).
_GAUSSIAN_CUTOFF = float(np.finfo(np.float64).eps)
# The focal loss clamp bounds (applied in the accumulation dtype).
CLAMP_LOW = 1e-4
CLAMP_HIGH = 1.0 - 1e-4

# numba.cuda once a CUDA kernel is built (see targets.bind_cuda for why a module global).
cuda = None


def _decode_functions(t):
    real = t.real

    @t.device
    def better(score_a, index_a, score_b, index_b):
        """The strict total order of the top-K: higher score first, then lower flat index."""
        return score_a > score_b or (score_a == score_b and index_a < index_b)

    @t.device
    def sift_down(scores, indices, base, size, pos):
        """Restore the heap (root = worst) below ``pos`` in entries base .. base + size - 1."""
        while True:
            child = 2 * pos + 1
            if child >= size:
                return
            right = child + 1
            if right < size and better(scores[base + child], indices[base + child], scores[base + right],
                                       indices[base + right]):
                child = right  # the worse child
            if not better(scores[base + pos], indices[base + pos], scores[base + child], indices[base + child]):
                return
            scores[base + pos], scores[base + child] = scores[base + child], scores[base + pos]
            indices[base + pos], indices[base + child] = indices[base + child], indices[base + pos]
            pos = child

    @t.device
    def offer(scores, indices, base, count, capacity, score, index):
        """Offer (score, index) to the heap of ``count`` entries at ``base``; returns the new count."""
        if count < capacity:
            pos = count
            scores[base + pos] = score
            indices[base + pos] = index
            while pos > 0:  # sift up: a worse entry rises towards the root
                parent = (pos - 1) // 2
                if not better(scores[base + parent], indices[base + parent], score, index):
                    break
                scores[base + pos] = scores[base + parent]
                indices[base + pos] = indices[base + parent]
                scores[base + parent] = score
                indices[base + parent] = index
                pos = parent
            return count + 1
        if better(score, index, scores[base], indices[base]):
            scores[base] = score
            indices[base] = index
            sift_down(scores, indices, base, capacity, 0)
        return count

    @t.device
    def heap_sort(scores, indices, base, size):
        """Sort a heap (root = worst) in place, best first."""
        for end in range(size - 1, 0, -1):
            scores[base], scores[base + end] = scores[base + end], scores[base]
            indices[base], indices[base + end] = indices[base + end], indices[base]
            sift_down(scores, indices, base, end, 0)

    @t.device
    def peak_score(heat, index, height, width, half):
        """The score of flat heat element ``index`` (pixel (y, x) of its plane): its value if no
        neighbour within ``half`` pixels is larger (NaN neighbours never are), else 0; 0 for NaN."""
        value = heat[index]
        if value != value:
            return real(0)
        pixel = index % (height * width)
        y = pixel // width
        x = pixel - y * width
        plane = index - pixel
        for yy in range(max(y - half, 0), min(y + half + 1, height)):
            row = plane + yy * width
            for xx in range(max(x - half, 0), min(x + half + 1, width)):
                if heat[row + xx] > value:
                    return real(0)
        return value

    @t.device
    def chunk_candidates(heat, scores, indices, b, chunk, chunk_size, capacity, params):
        """Pass 1 for chunk ``chunk`` of image ``b``: its best ``capacity`` candidates."""
        classes, height, width, kernel = params[1], params[2], params[3], params[5]
        per_image = classes * height * width
        n_chunks = (per_image + chunk_size - 1) // chunk_size
        base = (b * n_chunks + chunk) * capacity
        first = chunk * chunk_size
        count = 0
        for i in range(first, min(first + chunk_size, per_image)):
            # Once the heap is full, index i (above every index in it) enters only with a score
            # above the root's; its score is its value or 0, so most pixels need no peak test.
            value = heat[b * per_image + i]
            if count == capacity and not value > scores[base] and not real(0) > scores[base]:
                continue
            score = peak_score(heat, b * per_image + i, height, width, kernel // 2)
            count = offer(scores, indices, base, count, capacity, score, i)

    @t.device
    def write_detection(detections, slot, score, index, b, wh, reg, params):
        """Detection row ``slot`` for flat index ``index`` of image ``b`` with ``score``."""
        (_, classes, height, width, _, _, cat_spec_wh, has_reg, down_ratio, has_threshold,
         threshold) = params
        pixels = height * width
        c = index // pixels
        pixel = index - c * pixels
        y = pixel // width
        x = pixel - y * width
        if has_reg:
            xs = real(x) + reg[(b * 2) * pixels + pixel]
            ys = real(y) + reg[(b * 2 + 1) * pixels + pixel]
        else:
            xs = real(x) + real(0.5)
            ys = real(y) + real(0.5)
        size_channel = b * (2 * classes if cat_spec_wh else 2) + (2 * c if cat_spec_wh else 0)
        half_w = wh[size_channel * pixels + pixel] / real(2)
        half_h = wh[(size_channel + 1) * pixels + pixel] / real(2)
        label = c
        if has_threshold and score < threshold:
            score = real(0)
            label = -1
        row = slot * 6
        detections[row] = (xs - half_w) * down_ratio
        detections[row + 1] = (ys - half_h) * down_ratio
        detections[row + 2] = (xs + half_w) * down_ratio
        detections[row + 3] = (ys + half_h) * down_ratio
        detections[row + 4] = score
        detections[row + 5] = real(label)

    @t.device
    def merge_image(b, wh, reg, chunk_scores, chunk_indices, scores, indices, detections, chunk_size, capacity,
                    params):
        """Pass 2 for image ``b``: the top-K of its candidates, best first, as detections."""
        classes, height, width, k = params[1], params[2], params[3], params[4]
        per_image = classes * height * width
        n_chunks = (per_image + chunk_size - 1) // chunk_size
        kept = min(k, per_image)
        base = b * kept
        count = 0
        for chunk in range(n_chunks):
            from_chunk = min(capacity, per_image - chunk * chunk_size)
            first = (b * n_chunks + chunk) * capacity
            for j in range(first, first + from_chunk):
                count = offer(scores, indices, base, count, kept, chunk_scores[j], chunk_indices[j])
        heap_sort(scores, indices, base, kept)
        for slot in range(kept):
            write_detection(detections, b * k + slot, scores[base + slot], indices[base + slot], b, wh, reg, params)
        for slot in range(b * k + kept, (b + 1) * k):
            for column in range(5):
                detections[slot * 6 + column] = real(0)
            detections[slot * 6 + 5] = real(-1)

    return chunk_candidates, merge_image


def _max_into(t):
    """``array[index] = max(array[index], value)``: atomic on CUDA; on the CPU the task owns
    the element."""
    if t.name == "cuda":
        @t.device
        def max_into(array, index, value):
            cuda.atomic.max(array, index, value)
    else:
        @t.device
        def max_into(array, index, value):
            if value > array[index]:
                array[index] = value
    return max_into


def _targets_functions(t):
    """The targets' per-object function. Its geometry (clipped box, radius, centre, Gaussian) is
    float64 on every target, with float64 params, as in the CUDA C kernel: the radius and the
    centre are truncated to integers, which must be exactly the reference's. One thread per
    object and per Gaussian pixel: the float64 rate does not matter."""
    max_into = _max_into(t)

    @t.device
    def radius_of(height, width, min_overlap):
        """The original code's Gaussian radius for a box of (rounded-up) height x width."""
        o = min_overlap
        b1 = height + width
        c1 = width * height * (1 - o) / (1 + o)
        r1 = (b1 + math.sqrt(b1 * b1 - 4 * c1)) / 2
        b2 = 2 * (height + width)
        c2 = (1 - o) * width * height
        r2 = (b2 + math.sqrt(b2 * b2 - 16 * c2)) / 2
        b3 = -2 * o * (height + width)
        c3 = (o - 1) * width * height
        r3 = (b3 + math.sqrt(b3 * b3 - 16 * o * c3)) / 2
        return max(0, int(min(r1, r2, r3)))

    @t.device
    def draw_object(boxes, b, m, heatmap, wh, reg, ind, reg_mask, label, params):
        """Object m of image b with class ``label``: its Gaussian into heatmap plane (b, label)
        and its slot m, if its clipped box is not empty."""
        _, max_boxes, num_classes, out_h, out_w, down_ratio, min_overlap, max_objects = params
        box = (b * max_boxes + m) * 4
        for q in range(4):
            # A non-finite box is skipped (Python rejects it unless the host check is skipped,
            # see pydeform._arrays.unchecked_values); v - v is 0 exactly for finite v.
            if not (boxes[box + q] - boxes[box + q] == 0.0):
                return
        x1 = min(max(boxes[box] / down_ratio, 0.0), out_w - 1.0)
        y1 = min(max(boxes[box + 1] / down_ratio, 0.0), out_h - 1.0)
        x2 = min(max(boxes[box + 2] / down_ratio, 0.0), out_w - 1.0)
        y2 = min(max(boxes[box + 3] / down_ratio, 0.0), out_h - 1.0)
        h = y2 - y1
        w = x2 - x1
        if not (h > 0 and w > 0):
            return
        radius = radius_of(math.ceil(h), math.ceil(w), min_overlap)
        cx = (x1 + x2) / 2
        cy = (y1 + y2) / 2
        ix = int(cx)  # cx >= 0: truncation is the original's int()
        iy = int(cy)
        sigma = (2 * radius + 1) / 6
        plane = (b * num_classes + label) * out_h * out_w
        for dy in range(-min(iy, radius), min(out_h - iy, radius + 1)):
            for dx in range(-min(ix, radius), min(out_w - ix, radius + 1)):
                value = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
                if value >= _GAUSSIAN_CUTOFF:
                    max_into(heatmap, plane + (iy + dy) * out_w + ix + dx, value)
        slot = b * max_objects + m
        wh[2 * slot] = w
        wh[2 * slot + 1] = h
        reg[2 * slot] = cx - ix
        reg[2 * slot + 1] = cy - iy
        ind[slot] = iy * out_w + ix
        reg_mask[slot] = 1

    return draw_object


def _focal_functions(t):
    real = t.real

    @t.device
    def focal_terms(p, y, alpha, beta, low, high):
        """(positive term, negative term, 1 if positive) of one pixel, p clamped to [low, high];
        a NaN term for a target outside [0, 1] (or NaN), which only an unchecked call passes."""
        p = min(max(p, low), high)
        zero, one = real(0), real(1)
        if y == one:
            return -math.log(p) * (one - p) ** alpha, zero, one
        if y >= zero and y < one:
            return zero, -math.log(one - p) * p ** alpha * (one - y) ** beta, zero
        return real(math.nan), zero, zero

    @t.device
    def focal_grad(p, y, alpha, beta, low, high, scale):
        """d loss / d p of one pixel, ``scale`` = grad_output / max(number of positives, 1)."""
        zero, one = real(0), real(1)
        if not (y >= zero and y <= one):
            return real(math.nan)  # a target outside [0, 1], as in focal_terms
        if not (p >= low and p <= high):
            return zero  # the clamp acts (or p is NaN): no gradient, torch.clamp's rule
        if y == one:
            return scale * (-(one - p) ** alpha / p + alpha * math.log(p) * (one - p) ** (alpha - one))
        weight = (one - y) ** beta
        return scale * weight * (p ** alpha / (one - p) - alpha * math.log(one - p) * p ** (alpha - one))

    @t.device
    def chunk_sums(pred, target, partials, chunk, n, alpha, beta, low, high):
        pos = real(0)
        neg = real(0)
        positives = real(0)
        for i in range(chunk * FOCAL_CHUNK, min((chunk + 1) * FOCAL_CHUNK, n)):
            a, b, c = focal_terms(pred[i], target[i], alpha, beta, low, high)
            pos += a
            neg += b
            positives += c
        partials[3 * chunk] = pos
        partials[3 * chunk + 1] = neg
        partials[3 * chunk + 2] = positives

    @t.device
    def total(partials, sums, column, n_chunks):
        value = real(0)
        for chunk in range(n_chunks):
            value += partials[3 * chunk + column]
        sums[column] = value

    return focal_terms, focal_grad, chunk_sums, total


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """``(candidates, merge, targets, focal_partials, focal_total, focal_grad)`` for the CPU."""
    from numba import prange

    t = cpu_target()
    chunk_candidates, merge_image = _decode_functions(t)
    draw_object = _targets_functions(t)
    _, focal_grad, chunk_sums, total = _focal_functions(t)

    @cpu_kernel
    def candidates(heat, chunk_scores, chunk_indices, chunk_size, capacity, params, n_tasks):
        per_image = params[1] * params[2] * params[3]
        n_chunks = (per_image + chunk_size - 1) // chunk_size
        for task in prange(n_tasks):
            b = task // n_chunks
            chunk_candidates(heat, chunk_scores, chunk_indices, b, task - b * n_chunks, chunk_size, capacity, params)

    @cpu_kernel
    def merge(wh, reg, chunk_scores, chunk_indices, scores, indices, detections, chunk_size, capacity, params):
        for b in prange(params[0]):
            merge_image(b, wh, reg, chunk_scores, chunk_indices, scores, indices, detections, chunk_size, capacity,
                        params)

    @cpu_kernel
    def targets(boxes, labels, heatmap, wh, reg, ind, reg_mask, params):
        batch, max_boxes, num_classes, max_objects = params[0], params[1], params[2], params[7]
        for task in prange(batch * num_classes):
            b = task // num_classes
            label = task - b * num_classes
            for m in range(min(max_boxes, max_objects)):
                if labels[b * max_boxes + m] == label:
                    draw_object(boxes, b, m, heatmap, wh, reg, ind, reg_mask, label, params)

    @cpu_kernel
    def focal_partials(pred, target, partials, n, alpha, beta, low, high):
        for chunk in prange((n + FOCAL_CHUNK - 1) // FOCAL_CHUNK):
            chunk_sums(pred, target, partials, chunk, n, alpha, beta, low, high)

    @cpu_kernel
    def focal_total(partials, sums, n_chunks):
        for column in prange(3):
            total(partials, sums, column, n_chunks)

    @cpu_kernel
    def grad(grad_output, pred, target, sums, grad_pred, alpha, beta, low, high):
        scale = grad_output[0] / max(sums[2], 1.0)
        for i in prange(pred.size):
            grad_pred[i] = focal_grad(pred[i], target[i], alpha, beta, low, high, scale)

    return candidates, merge, targets, focal_partials, focal_total, grad


@functools.lru_cache(maxsize=None)
def cuda_kernels(dtype):
    """The CUDA kernels computing in ``dtype`` (the accumulation dtype), in the order of
    :func:`cpu_kernels`, grid-stride loops over items. The targets kernel does its geometry in
    float64 whatever ``dtype`` (see :func:`_targets_functions`)."""
    global cuda
    cuda = bind_cuda()
    t = cuda_target(dtype)
    real = t.real
    chunk_candidates, merge_image = _decode_functions(t)
    draw_object = _targets_functions(t)
    _, focal_grad, chunk_sums, total = _focal_functions(t)

    @cuda_kernel
    def candidates(heat, chunk_scores, chunk_indices, chunk_size, capacity, params, n_tasks):
        per_image = params[1] * params[2] * params[3]
        n_chunks = (per_image + chunk_size - 1) // chunk_size
        for task in range(cuda.grid(1), n_tasks, cuda.gridsize(1)):
            b = task // n_chunks
            chunk_candidates(heat, chunk_scores, chunk_indices, b, task - b * n_chunks, chunk_size, capacity, params)

    @cuda_kernel
    def merge(wh, reg, chunk_scores, chunk_indices, scores, indices, detections, chunk_size, capacity, params):
        for b in range(cuda.grid(1), params[0], cuda.gridsize(1)):
            merge_image(b, wh, reg, chunk_scores, chunk_indices, scores, indices, detections, chunk_size, capacity,
                        params)

    @cuda_kernel
    def targets(boxes, labels, heatmap, wh, reg, ind, reg_mask, params):
        max_boxes, max_objects = params[1], params[7]
        drawn = min(max_boxes, max_objects)
        for item in range(cuda.grid(1), params[0] * drawn, cuda.gridsize(1)):
            b = item // drawn
            m = item - b * drawn
            label = labels[b * max_boxes + m]
            if label >= 0 and label < params[2]:  # padding, or a label the host did not check
                draw_object(boxes, b, m, heatmap, wh, reg, ind, reg_mask, label, params)

    @cuda_kernel
    def focal_partials(pred, target, partials, n, alpha, beta, low, high):
        for chunk in range(cuda.grid(1), (n + FOCAL_CHUNK - 1) // FOCAL_CHUNK, cuda.gridsize(1)):
            chunk_sums(pred, target, partials, chunk, n, alpha, beta, low, high)

    @cuda_kernel
    def focal_total(partials, sums, n_chunks):
        for column in range(cuda.grid(1), 3, cuda.gridsize(1)):
            total(partials, sums, column, n_chunks)

    @cuda_kernel
    def grad(grad_output, pred, target, sums, grad_pred, alpha, beta, low, high):
        scale = grad_output[0] / max(sums[2], real(1))
        for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
            grad_pred[i] = focal_grad(pred[i], target[i], alpha, beta, low, high, scale)

    return candidates, merge, targets, focal_partials, focal_total, grad


def cuda_chunk(per_image: int, k: int) -> int:
    """Scores per CUDA decode thread: a thread walks its chunk serially (pass 1) and one thread
    per image walks every chunk's candidates (pass 2), so their serial lengths, ``chunk`` and
    ``per_image / chunk * min(k, chunk)``, are balanced: ``chunk = sqrt(per_image * k)``, at least
    :data:`MIN_CUDA_CHUNK` (the GPU shape of docs/benchmarks.md: 11448 scores, 115 threads per image)."""
    return max(MIN_CUDA_CHUNK, math.isqrt(per_image * min(k, per_image)))


def _clamp_bounds(dtype):
    """The focal loss clamp bounds rounded to the accumulation dtype ``dtype``, as floats."""
    return float(dtype.type(CLAMP_LOW)), float(dtype.type(CLAMP_HIGH))


class _CenterNetKernelSet:
    """The kernel-set interface of :mod:`pydeform.centernet` over the kernels of one target;
    subclasses give ``xp``, ``_kernels(dtype)`` (for the accumulation dtype),
    ``_floats(values, dtype)`` (the kernels' float arguments), ``_run(kernel, n_items, *args)`` and
    ``_chunk(per_image, k)``, the number of flat scores per decode task (pass 1). float16 /
    bfloat16 arrays (CUDA only) are read from float32 copies in planned scratch slots, and a
    half-type gradient is written back from one."""

    def _decode_layout(self, params) -> tuple:
        """(decode tasks, scores per task, candidates per task, detections kept per image)."""
        per_image = params.classes * params.height * params.width
        chunk = self._chunk(per_image, params.k)
        return params.batch * -(-per_image // chunk), chunk, min(params.k, chunk), min(params.k, per_image)

    def _candidate_buffers(self, params, acc) -> dict:
        """The decode's candidate lists, ``{slot: (shape, dtype)}`` in the order the merge kernel
        takes them (``acc``: the detections' dtype): every task's candidates, then each image's
        merged top-K."""
        n_tasks, _, capacity, kept = self._decode_layout(params)
        candidates, merged = (n_tasks * capacity,), (params.batch * kept,)
        return {"centernet_chunk_scores": (candidates, acc), "centernet_chunk_indices": (candidates, np.int64),
                "centernet_top_scores": (merged, acc), "centernet_top_indices": (merged, np.int64)}

    def decode_workspace(self, params, dtype) -> dict:
        """The scratch one :meth:`decode` call takes, ``{slot: (shape, dtype)}`` (``dtype``:
        heat's): the candidate lists and, for half types, float32 copies of heat, wh and reg."""
        maps = (params.height, params.width)
        shapes = {"heat": (params.batch, params.classes, *maps),
                  "wh": (params.batch, 2 * params.classes if params.cat_spec_wh else 2, *maps)}
        if params.has_reg:
            shapes["reg"] = (params.batch, 2, *maps)
        return {**self._candidate_buffers(params, accumulation_dtype(dtype)), **accumulator_plans(shapes, dtype)}

    def decode(self, heat, wh, reg, detections, params):
        xp = self.xp
        n_tasks, chunk, capacity, _ = self._decode_layout(params)
        buffers = [scratch(xp, slot, *spec)
                   for slot, spec in self._candidate_buffers(params, detections.dtype).items()]
        heat, wh, reg = converted_arrays(self.xp, {"heat": heat, "wh": wh, "reg": reg})
        # A stand-in for an absent reg that is never read, not a view of another argument.
        reg = xp.zeros(1, heat.dtype) if reg is None else reg
        candidates, merge = self._kernels(detections.dtype)[:2]
        batch, params = params.batch, self._floats(params, detections.dtype)
        self._run(candidates, n_tasks, flat(heat), *buffers[:2], chunk, capacity, params, n_tasks)
        self._run(merge, batch, flat(wh), flat(reg), *buffers, flat(detections), chunk, capacity, params)

    def targets(self, boxes, labels, heatmap, wh, reg, ind, reg_mask, params):
        # The item count is the CUDA kernel's (one thread per object); the CPU kernel's tasks
        # are heatmap planes.
        items = params.batch * min(params.max_boxes, params.max_objects)
        arrays = (boxes, labels, heatmap, wh, reg, ind, reg_mask)
        # Python floats on every target: the geometry is float64 (see _targets_functions).
        self._run(self._kernels(boxes.dtype)[2], items, *(flat(a) for a in arrays), tuple(params))

    @staticmethod
    def focal_loss_workspace(size: int, dtype, *, backward: bool = False) -> dict:
        """The scratch one :meth:`focal_loss_sums` call (and with ``backward`` the
        :meth:`focal_loss_grad` call after it) takes for ``size`` pixels of storage type
        ``dtype``, ``{slot: (shape, dtype)}``: the partial sums of every chunk in the
        accumulation dtype; for half types float32 copies of pred and target (and of
        grad_output and grad_pred)."""
        shapes = {"pred": (size,), "target": (size,)}
        if backward:
            shapes.update(grad_output=(), grad_pred=(size,))
        partials = {FOCAL_PARTIALS_SLOT: ((3 * -(-size // FOCAL_CHUNK),), accumulation_dtype(dtype))}
        return {**partials, **accumulator_plans(shapes, dtype)}

    def focal_loss_sums(self, pred, target, sums, params):
        n = pred.size
        n_chunks = -(-n // FOCAL_CHUNK)
        plan = self.focal_loss_workspace(n, pred.dtype)
        partials = scratch(self.xp, FOCAL_PARTIALS_SLOT, *plan[FOCAL_PARTIALS_SLOT])
        pred, target = converted_arrays(self.xp, {"pred": pred, "target": target})
        focal_partials, focal_total = self._kernels(sums.dtype)[3:5]
        floats = self._floats((params.alpha, params.beta, *_clamp_bounds(sums.dtype)), sums.dtype)
        self._run(focal_partials, n_chunks, flat(pred), flat(target), partials, n, *floats)
        self._run(focal_total, 3, partials, sums, n_chunks)

    def focal_loss_grad(self, grad_output, pred, target, sums, grad_pred, params):
        grad_output, pred, target, computed = converted_arrays(
            self.xp, {"grad_output": grad_output, "pred": pred, "target": target, "grad_pred": grad_pred})
        floats = self._floats((params.alpha, params.beta, *_clamp_bounds(sums.dtype)), sums.dtype)
        self._run(self._kernels(sums.dtype)[5], pred.size, grad_output.reshape(1), flat(pred), flat(target), sums,
                  flat(computed), *floats)
        if computed is not grad_pred:
            grad_pred[...] = computed


class NumbaCpuCenterNetKernels(_CenterNetKernelSet):
    """CenterNet kernels for NumPy arrays, parallel with ``numba.prange``."""

    xp = np

    def __init__(self, chunk=CPU_CHUNK):
        self.chunk = chunk

    def _chunk(self, per_image, k):
        return self.chunk

    @staticmethod
    def _kernels(dtype):
        return cpu_kernels()

    @staticmethod
    def _floats(values, dtype):
        """Python floats: the CPU kernels compute in float64."""
        return tuple(values)

    @staticmethod
    def _run(kernel, n_items, *args):
        kernel(*args)


class NumbaCudaCenterNetKernels(_CenterNetKernelSet):
    """CenterNet kernels compiled with ``numba.cuda.jit`` for CuPy arrays.

    float16 / bfloat16 inputs are converted to float32 on the device before a launch, into the
    scratch slots ``decode_workspace`` / ``focal_loss_workspace`` plan (and a float16 / bfloat16
    gradient written back from float32). With ``xp=numpy`` the kernels run on host arrays under
    the CUDA simulator.
    """

    def __init__(self, xp=None, chunk=None):
        """``chunk``: scores per decode task, or None for :func:`cuda_chunk`."""
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.chunk = chunk

    def _chunk(self, per_image, k):
        return cuda_chunk(per_image, k) if self.chunk is None else self.chunk

    @staticmethod
    def _kernels(dtype):
        return cuda_kernels(dtype)

    @staticmethod
    def _floats(values, dtype):
        return typed_floats(values, dtype)

    def _run(self, kernel, n_items, *args):
        launch_cuda(kernel, n_items, self.xp, *args)
