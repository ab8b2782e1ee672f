// CenterNet (docs/centernet.md): heatmap decoding, training targets and the focal loss.
//
// Decode is two launches and reads the heatmap once:
//   centernet_decode_candidates  one block per tile of `tile` consecutive flat indices
//                                c*H*W + y*W + x of an image: the peak test of every element, then
//                                the tile's best min(K, tile length) (score, index) pairs, sorted
//                                best first, into a candidate list of the tile.
//   centernet_decode_detections  one block per image: the image's top min(K, C*H*W) of all its
//                                tile lists, selected through a sampled lower bound and a sort of
//                                the entries not below it, then the gather of wh / reg and the
//                                box assembly of each row.
// "Better" is the decode order: higher score, on equal scores the lower flat index; it is a total
// order, so the result does not depend on thread timing. The lists of all tiles hold every
// element that can be among an image's top K (a tile's best K contain all of its elements in the
// top K).
//
// The block kernels cooperate through shared memory, but every loop strides by blockDim.x and
// gridDim.x, so the kernels are also correct as one block of one thread (the CPU host shim).
//
// Targets: one work item per object slot and heatmap row; the items render the object's Gaussian
// row by row with an atomic element-wise maximum (order independent, so deterministic).
// Focal loss: fixed-order block partial sums, a one-block fixed-order total, and an element-wise
// gradient kernel; no float atomics, so the loss is the same on every run.

#include "common.cuh"

namespace pydeform {

// The largest decode tile: the capacity of the tile kernel's shared arrays (DECODE_TILE of
// centernet.py, which passes the tile size, at most this, to both decode kernels).
constexpr int kDecodeTile = 2048;
// The decode scan packs two counts of at most a tile into the halves of an int.
static_assert(kDecodeTile < (1 << 15), "packed segment counts would carry into each other");
// Capacity of the selection kernel's shared sample / survivor arrays.
constexpr int kSelectCapacity = 2048;

__device__ __forceinline__ float negative_infinity(float) {
    return __int_as_float(static_cast<int>(0xff800000u));
}
__device__ __forceinline__ double negative_infinity(double) {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}
__device__ __forceinline__ float quiet_nan(float) {
    return __int_as_float(0x7fc00000);
}
__device__ __forceinline__ double quiet_nan(double) {
    return __longlong_as_double(0x7ff8000000000000LL);
}

// The decode order: (score_a, index_a) comes before (score_b, index_b).
template <typename A>
__device__ __forceinline__ bool better(const A score_a, const long long index_a, const A score_b,
                                       const long long index_b) {
    return score_a > score_b || (score_a == score_b && index_a < index_b);
}

// ---------------------------------------------------------------------------------------------
// Decode

// heat [batch, classes, height, width]; detections [batch, k, 6]; `tile` flat indices per decode
// tile, 1 <= tile <= kDecodeTile.
#define PYDEFORM_CENTERNET_DECODE_GEOMETRY_PARAMS                                               \
    const long long classes, const long long height, const long long width, const long long k,  \
        const long long tile

struct DecodeTiles {
    long long image_size;  // classes * height * width
    long long size;        // flat indices per tile
    long long tiles;       // tiles per image
    long long capacity;    // entries per tile list: min(k, size)
};

__device__ __forceinline__ DecodeTiles decode_tiles(const long long classes, const long long height,
                                                    const long long width, const long long k,
                                                    const long long tile) {
    DecodeTiles t;
    t.image_size = classes * height * width;
    t.size = tile;
    t.tiles = (t.image_size + tile - 1) / tile;
    t.capacity = k < tile ? k : tile;
    return t;
}

// Flat indices of tile `tile`: size, or fewer for an image's last tile.
__device__ __forceinline__ long long tile_length(const DecodeTiles& t, const long long tile) {
    const long long rest = t.image_size - tile * t.size;
    return rest < t.size ? rest : t.size;
}

// Entries of tile `tile`'s list: its best min(k, tile length).
__device__ __forceinline__ long long tile_list_length(const DecodeTiles& t, const long long tile) {
    const long long length = tile_length(t, tile);
    return length < t.capacity ? length : t.capacity;
}

// Whether pixel (y, x) of value `centre` passes the peak test: no value of its kernel x kernel
// window, read by value(yy, xx), is larger (NaN neighbours never are, as NaN compares false); a
// NaN pixel never passes.
template <typename A, typename Value>
__device__ __forceinline__ bool is_peak(const A centre, const long long y, const long long x,
                                        const long long height, const long long width,
                                        const long long half, const Value& value) {
    if (isnan(centre)) {
        return false;
    }
    const long long y_end = y + half < height - 1 ? y + half : height - 1;
    const long long x_end = x + half < width - 1 ? x + half : width - 1;
    for (long long yy = y - half > 0 ? y - half : 0; yy <= y_end; ++yy) {
        for (long long xx = x - half > 0 ? x - half : 0; xx <= x_end; ++xx) {
            if (value(yy, xx) > centre) {
                return false;
            }
        }
    }
    return true;
}

// Entries of a best-first tile list that come before (score, flat).
template <typename A>
__device__ __forceinline__ long long count_better(const A* __restrict__ scores,
                                                  const int* __restrict__ indices,
                                                  const long long length,
                                                  const long long tile_begin, const A score,
                                                  const long long flat) {
    long long low = 0, high = length;
    while (low < high) {
        const long long middle = (low + high) / 2;
        if (better(scores[middle], tile_begin + indices[middle], score, flat)) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return low;
}

// The smallest power of two >= count (1 for count <= 1).
__device__ __forceinline__ int power_of_two_at_least(const int count) {
    int power = 1;
    while (power < count) {
        power *= 2;
    }
    return power;
}

// Sorts (scores, indices)[0, length) best first in place, length a power of two. Every thread of
// the block calls it; each (i, i ^ stride) pair of a step belongs to the thread owning i.
template <typename A, typename I>
__device__ __forceinline__ void block_bitonic_sort(A* scores, I* indices, const int length,
                                                   const int thread, const int threads) {
    for (int size = 2; size <= length; size *= 2) {
        for (int stride = size / 2; stride > 0; stride /= 2) {
            for (int i = thread; i < length; i += threads) {
                const int partner = i ^ stride;
                if (partner > i) {
                    const bool partner_first = (i & size) == 0;
                    const int first = partner_first ? partner : i;
                    const int second = partner_first ? i : partner;
                    if (better(scores[first], indices[first], scores[second], indices[second])) {
                        const A score = scores[i];
                        scores[i] = scores[partner];
                        scores[partner] = score;
                        const I index = indices[i];
                        indices[i] = indices[partner];
                        indices[partner] = index;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Writes detection rows: the box of flat index c*H*W + y*W + x from wh / reg, score and class.
template <typename T>
struct DetectionWriter {
    using A = acc_t<T>;
    const T* wh;   // [batch, 2 or 2*classes, height, width]
    const T* reg;  // [batch, 2, height, width] or null
    long long classes, height, width;
    bool cat_spec_wh, has_reg, has_threshold;
    A down_ratio, threshold;

    __device__ __forceinline__ void write(A* row, const long long image, const A score,
                                          const long long flat) const {
        const long long plane_size = height * width;
        const long long channel = flat / plane_size;
        const long long pixel = flat % plane_size;
        const long long size_channel = cat_spec_wh ? 2 * channel : 0;
        const long long wh_channels = cat_spec_wh ? 2 * classes : 2;
        const T* const wh_pixel = wh + (image * wh_channels + size_channel) * plane_size + pixel;
        const A w = load_acc(wh_pixel);
        const A h = load_acc(wh_pixel + plane_size);
        A xs = A(pixel % width), ys = A(pixel / width);
        if (has_reg) {
            xs += load_acc(reg + image * 2 * plane_size + pixel);
            ys += load_acc(reg + (image * 2 + 1) * plane_size + pixel);
        } else {
            xs += A(0.5);
            ys += A(0.5);
        }
        const bool below = has_threshold && score < threshold;
        row[0] = (xs - w / A(2)) * down_ratio;
        row[1] = (ys - h / A(2)) * down_ratio;
        row[2] = (xs + w / A(2)) * down_ratio;
        row[3] = (ys + h / A(2)) * down_ratio;
        row[4] = below ? A(0) : score;
        row[5] = below ? A(-1) : A(channel);
    }
};

// ---------------------------------------------------------------------------------------------
// Training targets

// heatmap[address] = max(heatmap[address], value) for value >= 0 over a zero-filled heatmap: the
// bit patterns of non-negative floats order like the floats themselves.
__device__ __forceinline__ void store_max_non_negative(float* address, const float value) {
    atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}
__device__ __forceinline__ void store_max_non_negative(double* address, const double value) {
    atomicMax(reinterpret_cast<unsigned long long*>(address),
              static_cast<unsigned long long>(__double_as_longlong(value)));
}

// The original training code's Gaussian radius for a box of height x width (docs/centernet.md).
__device__ __forceinline__ double gaussian_radius(const double height, const double width,
                                                  const double overlap) {
    const double b1 = height + width;
    const double c1 = width * height * (1 - overlap) / (1 + overlap);
    const double r1 = (b1 + sqrt(b1 * b1 - 4 * c1)) / 2;
    const double b2 = 2 * (height + width);
    const double c2 = (1 - overlap) * width * height;
    const double r2 = (b2 + sqrt(b2 * b2 - 16 * c2)) / 2;
    const double b3 = -2 * overlap * (height + width);
    const double c3 = (overlap - 1) * width * height;
    const double r3 = (b3 + sqrt(b3 * b3 - 16 * overlap * c3)) / 2;
    const double r12 = r1 < r2 ? r1 : r2;
    return r12 < r3 ? r12 : r3;
}

// ---------------------------------------------------------------------------------------------
// Focal loss

// pred clamped to [kClampLow, kClampHigh] in the accumulation type (torch.clamp's bounds).
constexpr double kClampLow = 1e-4;
constexpr double kClampHigh = 1.0 - 1e-4;

template <typename A>
struct FocalTerms {
    A positive;  // -log(p) (1 - p)^alpha where y == 1; NaN where y is outside [0, 1]
    A negative;  // -log(1 - p) p^alpha (1 - y)^beta where 0 <= y < 1
    A positives; // 1 where y == 1
};

// Comparisons rather than fmin / fmax, which would turn a NaN prediction into a bound: a NaN
// stays NaN, as with torch.clamp and the reference.
template <typename A>
__device__ __forceinline__ A clamp_prediction(const A pred) {
    return pred < A(kClampLow) ? A(kClampLow) : (pred > A(kClampHigh) ? A(kClampHigh) : pred);
}

template <typename A>
__device__ __forceinline__ FocalTerms<A> focal_terms(const A pred, const A y, const A alpha,
                                                     const A beta) {
    const A p = clamp_prediction(pred);
    FocalTerms<A> terms{A(0), A(0), A(0)};
    if (y == A(1)) {
        terms.positive = -log(p) * pow(A(1) - p, alpha);
        terms.positives = A(1);
    } else if (y >= A(0) && y < A(1)) {
        terms.negative = -log(A(1) - p) * pow(p, alpha) * pow(A(1) - y, beta);
    } else {
        // A target outside [0, 1] or NaN, which only an unchecked call passes: the loss is NaN.
        terms.positive = quiet_nan(A(0));
    }
    return terms;
}

// d(terms)/d(pred): zero where the clamp acts (pred outside [low, high], torch.clamp's rule); NaN
// for a target outside [0, 1], as in focal_terms.
template <typename A>
__device__ __forceinline__ A focal_derivative(const A pred, const A y, const A alpha, const A beta) {
    if (!(y >= A(0) && y <= A(1))) {
        return quiet_nan(A(0));
    }
    if (!(pred >= A(kClampLow) && pred <= A(kClampHigh))) {
        return A(0);
    }
    const A p = pred;
    if (y == A(1)) {
        return -pow(A(1) - p, alpha) / p + alpha * log(p) * pow(A(1) - p, alpha - A(1));
    }
    return (pow(p, alpha) / (A(1) - p) - alpha * log(A(1) - p) * pow(p, alpha - A(1))) *
           pow(A(1) - y, beta);
}

// In-place fixed-order tree sum of values[0 .. threads) into values[0]; every thread calls it.
template <typename A>
__device__ __forceinline__ void block_sum(A* values, const int thread, const int threads) {
    for (int active = threads; active > 1;) {
        const int half = (active + 1) / 2;
        if (thread < active - half) {
            values[thread] += values[thread + half];
        }
        __syncthreads();
        active = half;
    }
}

// The three sums of FocalTerms over the threads of a block, each thread contributing `own`; one
// shared slot per thread, so blocks have at most kThreadsPerBlock threads (as every launch has).
template <typename A>
__device__ __forceinline__ FocalTerms<A> block_focal_sums(const FocalTerms<A>& own, const int thread,
                                                          const int threads) {
    __shared__ A positive[kThreadsPerBlock];
    __shared__ A negative[kThreadsPerBlock];
    __shared__ A positives[kThreadsPerBlock];
    positive[thread] = own.positive;
    negative[thread] = own.negative;
    positives[thread] = own.positives;
    __syncthreads();
    block_sum(positive, thread, threads);
    block_sum(negative, thread, threads);
    block_sum(positives, thread, threads);
    const FocalTerms<A> total{positive[0], negative[0], positives[0]};
    __syncthreads();  // before a next call overwrites the shared arrays
    return total;
}

}  // namespace pydeform

// ---------------------------------------------------------------------------------------------
// Kernels

// heat [batch, classes, height, width] (`kernel` the odd peak window) -> candidate_scores /
// candidate_indices [batch, tiles, capacity]: list entry j of tile t is the tile's j-th best kept
// score and its index within the tile (flat index - t * tile); entries past the list length are
// unused.
//
// Per tile: the block loads the tile's heat values into shared memory with coalesced,
// independent loads (the heatmap's only read from DRAM), runs the peak test of each element
// against its neighbours there (global memory only for window pixels outside the tile), and keeps
// each element's score or 0. Every thread then counts the nonzero and positive scores of a
// contiguous segment; a block scan of those counts places every element. Zeros need no sorting:
// in index order they come right after the positive scores. The nonzero scores (usually the few
// peaks) are bitonic-sorted in shared memory; positives go first, negatives after the zeros.
template <typename T>
__global__ void centernet_decode_candidates(const T* __restrict__ heat,
                                            pydeform::acc_t<T>* __restrict__ candidate_scores,
                                            int* __restrict__ candidate_indices,
                                            const long long batch,
                                            PYDEFORM_CENTERNET_DECODE_GEOMETRY_PARAMS,
                                            const long long kernel) {
    using namespace pydeform;
    using A = acc_t<T>;
    __shared__ A tile_scores[kDecodeTile];  // heat values, then the kept scores
    __shared__ bool peaks[kDecodeTile];
    __shared__ A sort_scores[kDecodeTile];
    __shared__ int sort_indices[kDecodeTile];
    // Per thread: (positive count << 16) | nonzero count of its segment, scanned in place; both
    // counts are at most kDecodeTile < 2**15, so the packed sums neither carry into each other
    // nor reach the sign bit.
    __shared__ int segment_counts[kThreadsPerBlock];

    const DecodeTiles t = decode_tiles(classes, height, width, k, tile);
    const long long plane_size = height * width;
    const int thread = threadIdx.x;
    const int threads = blockDim.x;
    for (long long job = blockIdx.x; job < batch * t.tiles; job += gridDim.x) {
        const long long image = job / t.tiles;
        const long long tile_index = job % t.tiles;
        const long long tile_begin = tile_index * t.size;
        const int length = static_cast<int>(tile_length(t, tile_index));
        const long long tile_end = tile_begin + length;
        const int list_length = static_cast<int>(tile_list_length(t, tile_index));
        const T* const image_heat = heat + image * t.image_size;
        A* const list_scores = candidate_scores + job * t.capacity;
        int* const list_indices = candidate_indices + job * t.capacity;

        for (int i = thread; i < length; i += threads) {
            tile_scores[i] = load_acc(image_heat + tile_begin + i);
        }
        __syncthreads();
        for (int i = thread; i < length; i += threads) {
            const long long flat = tile_begin + i;
            const long long pixel = flat % plane_size;
            const long long plane_begin = flat - pixel;
            peaks[i] = is_peak(tile_scores[i], pixel / width, pixel % width, height, width, kernel / 2,
                               [&](const long long yy, const long long xx) {
                                   const long long neighbour = plane_begin + yy * width + xx;
                                   return neighbour >= tile_begin && neighbour < tile_end
                                              ? tile_scores[neighbour - tile_begin]
                                              : load_acc(image_heat + neighbour);
                               });
        }
        __syncthreads();
        // A kept -0 becomes +0 (adding +0), which ties with the zeros of non-peaks as the order
        // requires.
        for (int i = thread; i < length; i += threads) {
            tile_scores[i] = peaks[i] ? tile_scores[i] + A(0) : A(0);
        }
        __syncthreads();

        const int segment = (length + threads - 1) / threads;
        const int segment_begin = thread * segment < length ? thread * segment : length;
        const int segment_end = segment_begin + segment < length ? segment_begin + segment : length;
        int nonzero = 0, positive = 0;
        for (int i = segment_begin; i < segment_end; ++i) {
            nonzero += tile_scores[i] != A(0);
            positive += tile_scores[i] > A(0);
        }
        const int own_counts = (positive << 16) | nonzero;
        segment_counts[thread] = own_counts;
        __syncthreads();
        // Inclusive Hillis-Steele scan over the threads' packed counts.
        for (int offset = 1; offset < threads; offset *= 2) {
            const int add = thread >= offset ? segment_counts[thread - offset] : 0;
            __syncthreads();
            segment_counts[thread] += add;
            __syncthreads();
        }
        const int total_nonzero = segment_counts[threads - 1] & 0xffff;
        const int total_positive = segment_counts[threads - 1] >> 16;
        int nonzero_before = (segment_counts[thread] - own_counts) & 0xffff;
        for (int i = segment_begin; i < segment_end; ++i) {
            const A score = tile_scores[i];
            if (score != A(0)) {
                sort_scores[nonzero_before] = score;
                sort_indices[nonzero_before] = i;
                ++nonzero_before;
            } else {
                const int slot = total_positive + (i - nonzero_before);
                if (slot < list_length) {
                    list_scores[slot] = A(0);
                    list_indices[slot] = i;
                }
            }
        }
        // Pad to a power of two with entries after every real one (-inf, index past the tile).
        const int sort_length = power_of_two_at_least(total_nonzero);
        for (int i = total_nonzero + thread; i < sort_length; i += threads) {
            sort_scores[i] = negative_infinity(A(0));
            sort_indices[i] = length;
        }
        __syncthreads();
        block_bitonic_sort(sort_scores, sort_indices, sort_length, thread, threads);
        for (int rank = thread; rank < total_nonzero; rank += threads) {
            const int slot = rank < total_positive ? rank : rank + (length - total_nonzero);
            if (slot < list_length) {
                list_scores[slot] = sort_scores[rank];
                list_indices[slot] = sort_indices[rank];
            }
        }
        __syncthreads();  // the next tile reuses the shared arrays
    }
}

// Candidate lists (see centernet_decode_candidates), wh [batch, 2 or 2*classes, height, width],
// reg [batch, 2, height, width] or null -> detections [batch, k, 6] written entirely. One block
// per image; `found` = min(k, C*H*W) rows are detections, the rest (0, 0, 0, 0, 0, -1).
//
// The image's top `found` are selected in two steps, each list entry read once in the second:
// 1. a sample, the best few entries of every list (at most kSelectCapacity), is sorted; its
//    found-th best is a lower bound: at least `found` entries of the image are not worse;
// 2. every list entry not worse than the bound (a "survivor") is gathered, and the survivors are
//    sorted. Anything better than a survivor is a survivor, so the best `found` survivors are the
//    image's top `found`, in order.
// When the sample or the survivors do not fit the shared arrays (K past kSelectCapacity, or very
// unevenly spread winners), each entry's rank is counted instead, by a binary search in every
// other sorted list (stopping once the rank reaches `found`), and rows are written by rank.
template <typename T>
__global__ void centernet_decode_detections(
    const T* __restrict__ wh, const T* __restrict__ reg,
    const pydeform::acc_t<T>* __restrict__ candidate_scores, const int* __restrict__ candidate_indices,
    pydeform::acc_t<T>* __restrict__ detections, const long long batch,
    PYDEFORM_CENTERNET_DECODE_GEOMETRY_PARAMS, const int cat_spec_wh, const int has_reg,
    const pydeform::acc_t<T> down_ratio, const int has_threshold, const pydeform::acc_t<T> threshold) {
    using namespace pydeform;
    using A = acc_t<T>;
    __shared__ A chosen_scores[kSelectCapacity];
    __shared__ long long chosen_flat[kSelectCapacity];
    __shared__ int survivors;

    const DetectionWriter<T> writer{wh, reg, classes, height, width, cat_spec_wh != 0, has_reg != 0,
                                    has_threshold != 0, down_ratio, threshold};
    const DecodeTiles t = decode_tiles(classes, height, width, k, tile);
    const long long found = k < t.image_size ? k : t.image_size;
    const long long list_slots = t.tiles * t.capacity;
    // The sample: the best `per_list` entries of each of the first `sampled_lists` lists.
    const long long sampled_lists = t.tiles < kSelectCapacity ? t.tiles : kSelectCapacity;
    const long long per_list_limit = kSelectCapacity / sampled_lists;
    const long long per_list = per_list_limit < t.capacity ? per_list_limit : t.capacity;
    const int sample_length = static_cast<int>(sampled_lists * per_list);
    // Every list but an image's last holds `capacity` entries.
    const long long last_list = tile_list_length(t, t.tiles - 1);
    const long long sampled_entries =
        sampled_lists * per_list -
        (sampled_lists == t.tiles && last_list < per_list ? per_list - last_list : 0);
    const int thread = threadIdx.x;
    const int threads = blockDim.x;
    for (long long image = blockIdx.x; image < batch; image += gridDim.x) {
        const A* const scores = candidate_scores + image * list_slots;
        const int* const indices = candidate_indices + image * list_slots;
        A* const rows = detections + image * k * 6;
        for (long long slot = found + thread; slot < k; slot += threads) {
            for (int column = 0; column < 5; ++column) {
                rows[slot * 6 + column] = A(0);
            }
            rows[slot * 6 + 5] = A(-1);
        }

        bool selected = false;
        if (found <= kSelectCapacity && sampled_entries >= found) {
            const int sort_length = power_of_two_at_least(sample_length);
            for (int i = thread; i < sort_length; i += threads) {
                const long long list = i / per_list;
                const long long position = i % per_list;
                const bool real = i < sample_length && position < tile_list_length(t, list);
                const long long slot = list * t.capacity + position;
                chosen_scores[i] = real ? scores[slot] : negative_infinity(A(0));
                chosen_flat[i] = real ? list * t.size + indices[slot] : t.image_size;
            }
            if (thread == 0) {
                survivors = 0;
            }
            __syncthreads();
            block_bitonic_sort(chosen_scores, chosen_flat, sort_length, thread, threads);
            const A bound_score = chosen_scores[found - 1];
            const long long bound_flat = chosen_flat[found - 1];
            __syncthreads();  // everyone has the bound before the arrays take the survivors

            for (long long slot = thread; slot < list_slots; slot += threads) {
                const long long list = slot / t.capacity;
                if (slot % t.capacity >= tile_list_length(t, list)) {
                    continue;
                }
                const A score = scores[slot];
                const long long flat = list * t.size + indices[slot];
                if (!better(bound_score, bound_flat, score, flat)) {
                    const int place = atomicAdd(&survivors, 1);
                    if (place < kSelectCapacity) {
                        chosen_scores[place] = score;
                        chosen_flat[place] = flat;
                    }
                }
            }
            __syncthreads();
            const int survivor_count = survivors;
            if (survivor_count <= kSelectCapacity) {
                const int survivor_length = power_of_two_at_least(survivor_count);
                for (int i = survivor_count + thread; i < survivor_length; i += threads) {
                    chosen_scores[i] = negative_infinity(A(0));
                    chosen_flat[i] = t.image_size;
                }
                __syncthreads();
                block_bitonic_sort(chosen_scores, chosen_flat, survivor_length, thread, threads);
                for (long long rank = thread; rank < found; rank += threads) {
                    writer.write(rows + rank * 6, image, chosen_scores[rank], chosen_flat[rank]);
                }
                selected = true;
            }
        }
        if (!selected) {
            for (long long slot = thread; slot < list_slots; slot += threads) {
                const long long list = slot / t.capacity;
                const long long position = slot % t.capacity;
                if (position >= tile_list_length(t, list)) {
                    continue;
                }
                const A score = scores[slot];
                const long long flat = list * t.size + indices[slot];
                long long rank = position;
                for (long long other = 0; other < t.tiles && rank < found; ++other) {
                    if (other != list) {
                        rank += count_better(scores + other * t.capacity, indices + other * t.capacity,
                                             tile_list_length(t, other), other * t.size, score, flat);
                    }
                }
                if (rank < found) {
                    writer.write(rows + rank * 6, image, score, flat);
                }
            }
        }
        __syncthreads();  // the next image reuses the shared arrays
    }
}

// boxes [batch, max_boxes, 4] (x1, y1, x2, y2, input pixels), labels [batch, max_boxes] int64
// (-1 = padding) -> heatmap [batch, num_classes, out_h, out_w], wh / reg [batch, max_objects, 2],
// ind [batch, max_objects], reg_mask [batch, max_objects], all zero-filled before the launch.
// n_items = batch * min(max_boxes, max_objects) * out_h: one item per object slot and heatmap row
// (so that a large object's Gaussian is drawn by many threads); the item of the row of the
// object's centre also fills the slot. The geometry is done in double whatever the storage type,
// so radius and centre are exactly the reference's.
template <typename T>
__global__ void centernet_targets(
    const long long n_items, const pydeform::acc_t<T>* __restrict__ boxes,
    const long long* __restrict__ labels, pydeform::acc_t<T>* __restrict__ heatmap,
    pydeform::acc_t<T>* __restrict__ wh, pydeform::acc_t<T>* __restrict__ reg, long long* __restrict__ ind,
    unsigned char* __restrict__ reg_mask, const long long max_boxes,
    const long long num_classes, const long long out_h, const long long out_w,
    const double down_ratio, const double min_overlap, const long long max_objects) {
    using namespace pydeform;
    using A = acc_t<T>;
    const long long objects = max_boxes < max_objects ? max_boxes : max_objects;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const long long row = item % out_h;
        const long long image = item / out_h / objects;
        const long long object = item / out_h % objects;
        const long long label = labels[image * max_boxes + object];
        // Padding (-1) is skipped; so are a label outside [0, num_classes) and a non-finite box,
        // which Python rejects unless the call skips the host check (pydeform.torch /
        // pydeform.jax on the GPU, to avoid a synchronisation).
        if (label < 0 || label >= num_classes) {
            continue;
        }
        const A* const box = boxes + (image * max_boxes + object) * 4;
        if (!(box[0] - box[0] == A(0) && box[1] - box[1] == A(0) && box[2] - box[2] == A(0) &&
              box[3] - box[3] == A(0))) {
            continue;
        }
        const double x_max = double(out_w - 1), y_max = double(out_h - 1);
        const double x1 = fmin(fmax(double(box[0]) / down_ratio, 0.0), x_max);
        const double y1 = fmin(fmax(double(box[1]) / down_ratio, 0.0), y_max);
        const double x2 = fmin(fmax(double(box[2]) / down_ratio, 0.0), x_max);
        const double y2 = fmin(fmax(double(box[3]) / down_ratio, 0.0), y_max);
        const double h = y2 - y1, w = x2 - x1;
        if (!(h > 0 && w > 0)) {
            continue;
        }
        const double r = gaussian_radius(ceil(h), ceil(w), min_overlap);
        const long long radius = r >= 1 ? static_cast<long long>(r) : 0;  // max(0, int(r))
        const double cx = (x1 + x2) / 2, cy = (y1 + y2) / 2;
        const long long ix = static_cast<long long>(cx), iy = static_cast<long long>(cy);

        if (row >= iy - radius && row <= iy + radius) {
            const double sigma = double(2 * radius + 1) / 6;
            const double dy = double(row - iy);
            A* const heat_row = heatmap + ((image * num_classes + label) * out_h + row) * out_w;
            const long long x_end = ix + radius < out_w - 1 ? ix + radius : out_w - 1;
            for (long long x = ix - radius > 0 ? ix - radius : 0; x <= x_end; ++x) {
                const double dx = double(x - ix);
                const double g = exp(-(dy * dy + dx * dx) / (2 * sigma * sigma));
                // The original zeroes entries below eps(float64) * max (the max is exp(0) = 1);
                // a zero never raises the zero-filled heatmap.
                if (g >= 2.220446049250313e-16) {
                    store_max_non_negative(heat_row + x, A(g));
                }
            }
        }
        if (row != iy) {
            continue;
        }
        const long long slot = image * max_objects + object;
        wh[2 * slot] = A(w);
        wh[2 * slot + 1] = A(h);
        reg[2 * slot] = A(cx - double(ix));
        reg[2 * slot + 1] = A(cy - double(iy));
        ind[slot] = iy * out_w + ix;
        reg_mask[slot] = 1;
    }
}

// pred / target [n_items] -> partials [n_parts, 3]: part q sums the terms of items
// [q * part_size, (q + 1) * part_size), thread by thread in a fixed order.
template <typename T>
__global__ void centernet_focal_loss_partials(const long long n_items, const long long n_parts,
                                              const T* __restrict__ pred,
                                              const T* __restrict__ target,
                                              pydeform::acc_t<T>* __restrict__ partials,
                                              const pydeform::acc_t<T> alpha, const pydeform::acc_t<T> beta) {
    using namespace pydeform;
    using A = acc_t<T>;
    const long long part_size = (n_items + n_parts - 1) / n_parts;
    const int thread = threadIdx.x;
    for (long long part = blockIdx.x; part < n_parts; part += gridDim.x) {
        const long long end = (part + 1) * part_size < n_items ? (part + 1) * part_size : n_items;
        FocalTerms<A> own{A(0), A(0), A(0)};
        for (long long i = part * part_size + thread; i < end; i += blockDim.x) {
            const FocalTerms<A> terms = focal_terms(load_acc(pred + i), load_acc(target + i), alpha, beta);
            own.positive += terms.positive;
            own.negative += terms.negative;
            own.positives += terms.positives;
        }
        const FocalTerms<A> total = block_focal_sums(own, thread, static_cast<int>(blockDim.x));
        if (thread == 0) {
            partials[3 * part] = total.positive;
            partials[3 * part + 1] = total.negative;
            partials[3 * part + 2] = total.positives;
        }
    }
}

// partials [n_parts, 3] -> sums [3], by one block in a fixed order.
template <typename T>
__global__ void centernet_focal_loss_total(const long long n_parts,
                                           const pydeform::acc_t<T>* __restrict__ partials,
                                           pydeform::acc_t<T>* __restrict__ sums) {
    using namespace pydeform;
    using A = acc_t<T>;
    if (blockIdx.x != 0) {
        return;
    }
    const int thread = threadIdx.x;
    FocalTerms<A> own{A(0), A(0), A(0)};
    for (long long part = thread; part < n_parts; part += blockDim.x) {
        own.positive += partials[3 * part];
        own.negative += partials[3 * part + 1];
        own.positives += partials[3 * part + 2];
    }
    const FocalTerms<A> total = block_focal_sums(own, thread, static_cast<int>(blockDim.x));
    if (thread == 0) {
        sums[0] = total.positive;
        sums[1] = total.negative;
        sums[2] = total.positives;
    }
}

// grad_pred[i] = grad_output * d(terms)/d(pred[i]) / max(sums[2], 1) over n_items elements.
template <typename T>
__global__ void centernet_focal_loss_grad(const long long n_items, const T* __restrict__ grad_output,
                                          const T* __restrict__ pred, const T* __restrict__ target,
                                          const pydeform::acc_t<T>* __restrict__ sums,
                                          T* __restrict__ grad_pred, const pydeform::acc_t<T> alpha,
                                          const pydeform::acc_t<T> beta) {
    using namespace pydeform;
    using A = acc_t<T>;
    const A scale = load_acc(grad_output) / fmax(sums[2], A(1));
    for (long long i = grid_stride_begin(); i < n_items; i += grid_stride_step()) {
        grad_pred[i] = from_acc<T>(scale * focal_derivative(load_acc(pred + i), load_acc(target + i),
                                                            alpha, beta));
    }
}
