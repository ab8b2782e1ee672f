// Semi-convolutional operators (docs/semiconv.md): per-instance statistics and the instance mean
// loss's gradient, affinities, seeded mask logits, Hough votes and the assignment to centers.
//
// Every kernel reads psi, or phi with the pixel coordinates added on the fly: channel 0 gets
// sy * y and channel 1 gets sx * x (sy = sx = 0 without coordinates), so no grid is stored.
//
// Segmented reductions run one block per (image, instance) (statistics, the centers' and sigma's
// gradients) or per region (seeded masks): the block's threads stride over the pixels, each
// keeping a partial sum, and a fixed-shape tree in shared memory adds the partials. No float
// atomics: the sums, and so the results, are identical run to run. The votes are integer counts
// added with integer atomics (exact in any order). Every loop strides by blockDim.x and
// gridDim.x, so the block kernels are also correct as one block of one thread (the host shim).

#include "common.cuh"

namespace pydeform {

// Image geometry of a launch and the coordinate factors of channels 0 and 1.
#define PYDEFORM_SEMICONV_GEOMETRY_PARAMS                                                        \
    const long long batch, const long long dims, const long long height, const long long width, \
        const acc_t<T> sy, const acc_t<T> sx

// Channel d of pixel p = y * width + x of an image's embedding `image` [dims, plane].
template <typename T>
__device__ __forceinline__ acc_t<T> embedding_value(const T* __restrict__ image, const long long plane,
                                                    const long long d, const long long p,
                                                    const long long width, const acc_t<T> sy,
                                                    const acc_t<T> sx) {
    using A = acc_t<T>;
    A value = load_acc(image + d * plane + p);
    if (d == 0) {
        value += sy * static_cast<A>(p / width);
    } else if (d == 1) {
        value += sx * static_cast<A>(p % width);
    }
    return value;
}

// ||psi_p - center||, center [dims] of type C (the storage or the accumulation type).
template <typename T, typename C>
__device__ __forceinline__ acc_t<T> embedding_distance(const T* __restrict__ image, const long long plane,
                                                       const long long dims, const long long p,
                                                       const long long width, const acc_t<T> sy,
                                                       const acc_t<T> sx, const C* center) {
    using A = acc_t<T>;
    A total = A(0);
    for (long long d = 0; d < dims; ++d) {
        const A diff = embedding_value(image, plane, d, p, width, sy, sx) - to_acc(center[d]);
        total += diff * diff;
    }
    return sqrt(total);
}

// The sum of every thread's `value`, returned to all threads of the block: a tree over the
// threads of fixed shape (halving the active count, the upper half added onto the lower), so the
// order of the additions depends only on blockDim.x. `shared` holds kThreadsPerBlock values.
template <typename V>
__device__ V block_sum(const V value, V* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (unsigned int active = blockDim.x; active > 1;) {
        const unsigned int half = (active + 1) / 2;
        if (threadIdx.x < active - half) {
            shared[threadIdx.x] += shared[threadIdx.x + half];
        }
        __syncthreads();
        active = half;
    }
    const V total = shared[0];
    __syncthreads();  // before the next call overwrites shared[0]
    return total;
}

// Whether score a at index ia is a better seed than b at ib (ib < 0: none yet): as NumPy's and
// PyTorch's argmax, NaN counts as the largest score; higher first, equal scores (NaN or not) by the
// lower index.
template <typename A>
__device__ __forceinline__ bool better_seed(const A a, const long long ia, const A b, const long long ib) {
    if (ib < 0) {
        return true;
    }
    if (isnan(b)) {
        return isnan(a) && ia < ib;
    }
    return isnan(a) || a > b || (a == b && ia < ib);
}

// Region r's seed pixel: the argmax of its scores (the first NaN if any, else the highest score,
// lowest index on ties).
template <typename T>
__device__ long long seed_pixel(const T* __restrict__ scores, const long long plane, acc_t<T>* shared_values,
                                long long* shared_indices) {
    using A = acc_t<T>;
    A best = A(0);
    long long best_index = -1;
    for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
        const A value = load_acc(scores + p);
        if (better_seed(value, p, best, best_index)) {
            best = value;
            best_index = p;
        }
    }
    shared_values[threadIdx.x] = best;
    shared_indices[threadIdx.x] = best_index;
    __syncthreads();
    for (unsigned int active = blockDim.x; active > 1;) {
        const unsigned int half = (active + 1) / 2;
        const unsigned int other = threadIdx.x + half;
        if (threadIdx.x < active - half &&
            better_seed(shared_values[other], shared_indices[other], shared_values[threadIdx.x],
                        shared_indices[threadIdx.x])) {
            shared_values[threadIdx.x] = shared_values[other];
            shared_indices[threadIdx.x] = shared_indices[other];
        }
        __syncthreads();
        active = half;
    }
    const long long found = shared_indices[0];
    __syncthreads();
    return found < 0 ? 0 : found;
}

// Region r's seed into seeds[0, dims) (and, with softmax, the weights of its pixels); returns the
// seed pixel (the argmax, also the softmax's shift).
template <typename T>
__device__ long long region_seed(const T* __restrict__ scores, const T* __restrict__ image,
                                 acc_t<T>* __restrict__ seeds, acc_t<T>* __restrict__ weights,
                                 const long long dims, const long long height, const long long width,
                                 const acc_t<T> sy, const acc_t<T> sx, const int softmax,
                                 acc_t<T>* shared_values, long long* shared_indices) {
    using A = acc_t<T>;
    const long long plane = height * width;
    const long long best = seed_pixel(scores, plane, shared_values, shared_indices);
    if (!softmax) {
        if (threadIdx.x == 0) {
            for (long long d = 0; d < dims; ++d) {
                seeds[d] = embedding_value(image, plane, d, best, width, sy, sx);
            }
        }
        __syncthreads();
        return best;
    }
    const A top = load_acc(scores + best);
    A partial = A(0);
    for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
        weights[p] = exp(load_acc(scores + p) - top);
        partial += weights[p];
    }
    const A total = block_sum(partial, shared_values);
    for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
        weights[p] /= total;
    }
    for (long long d = 0; d < dims; ++d) {
        partial = A(0);
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            partial += weights[p] * embedding_value(image, plane, d, p, width, sy, sx);
        }
        const A seed = block_sum(partial, shared_values);
        if (threadIdx.x == 0) {
            seeds[d] = seed;
        }
    }
    __syncthreads();
    return best;
}

__device__ __forceinline__ bool is_laplacian(const int kernel) { return kernel == 0; }

// (f, dist, a) of pixel p and a center: d A / d psi_p = f * (psi_p - center) for the upstream
// gradient g; the laplacian's unit vector is 0 at dist = 0.
template <typename A>
struct AffinityFactor {
    A f, dist, a;
};

template <typename T>
__device__ __forceinline__ AffinityFactor<acc_t<T>> affinity_factor(
    const acc_t<T> g, const T* __restrict__ image, const long long plane, const long long dims,
    const long long p, const long long width, const acc_t<T> sy, const acc_t<T> sx,
    const T* __restrict__ center, const acc_t<T> s, const int kernel) {
    using A = acc_t<T>;
    const A dist = embedding_distance(image, plane, dims, p, width, sy, sx, center);
    if (is_laplacian(kernel)) {
        const A a = exp(-dist / s);
        return {dist == A(0) ? A(0) : -g * a / (s * dist), dist, a};
    }
    const A a = exp(-(dist * dist) / (A(2) * s * s));
    return {-g * a / (s * s), dist, a};
}

// Rounding half away from zero, exactly (floor(v + 0.5) would round the sum first: the float
// just below 0.5 would give 1); NaN and infinities stay as they are.
template <typename A>
__device__ __forceinline__ A round_half_away(const A v) {
    return round(v);
}

}  // namespace pydeform

using pydeform::acc_t;
using pydeform::block_sum;
using pydeform::embedding_distance;
using pydeform::embedding_value;
using pydeform::from_acc;
using pydeform::grid_stride_begin;
using pydeform::grid_stride_step;
using pydeform::kThreadsPerBlock;
using pydeform::load_acc;
using pydeform::to_acc;

// One block per (image n, instance k): the instance's pixel count and sum of psi (sums [N, K, D]);
// with `with_norms` the sums become the means (0 for an empty instance), then the sums of
// ||psi_u - mean|| (norm_sums [N, K]) and of the unit vectors (unit_sums [N, K, D]) follow.
template <typename T>
__global__ void semiconv_statistics(const T* __restrict__ psi, const long long* __restrict__ labels,
                                    acc_t<T>* __restrict__ sums, long long* __restrict__ counts,
                                    acc_t<T>* __restrict__ norm_sums, acc_t<T>* __restrict__ unit_sums,
                                    PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long k_max,
                                    const int with_norms) {
    using A = acc_t<T>;
    __shared__ A shared[kThreadsPerBlock];
    __shared__ long long shared_counts[kThreadsPerBlock];
    const long long plane = height * width;
    for (long long task = blockIdx.x; task < batch * k_max; task += gridDim.x) {
        const long long n = task / k_max;
        const long long k = task - n * k_max + 1;
        const long long* image_labels = labels + n * plane;
        const T* image = psi + n * dims * plane;
        A* mean = sums + task * dims;
        long long partial_count = 0;
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            partial_count += image_labels[p] == k;
        }
        const long long count = block_sum(partial_count, shared_counts);
        for (long long d = 0; d < dims; ++d) {
            A partial = A(0);
            for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
                if (image_labels[p] == k) {
                    partial += embedding_value(image, plane, d, p, width, sy, sx);
                }
            }
            const A total = block_sum(partial, shared);
            if (threadIdx.x == 0) {
                mean[d] = with_norms && count > 0 ? total / static_cast<A>(count) : total;
            }
        }
        if (threadIdx.x == 0) {
            counts[task] = count;
        }
        if (!with_norms) {
            continue;
        }
        __syncthreads();  // the means, written by thread 0, are read by every thread below
        A partial = A(0);
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            if (image_labels[p] == k) {
                partial += embedding_distance(image, plane, dims, p, width, sy, sx, mean);
            }
        }
        const A norm_sum = block_sum(partial, shared);
        if (threadIdx.x == 0) {
            norm_sums[task] = norm_sum;
        }
        for (long long d = 0; d < dims; ++d) {
            partial = A(0);
            for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
                if (image_labels[p] != k) {
                    continue;
                }
                const A norm = embedding_distance(image, plane, dims, p, width, sy, sx, mean);
                if (norm != A(0)) {  // the unit vector is 0 at the kink (NaN passes)
                    partial += (embedding_value(image, plane, d, p, width, sy, sx) - mean[d]) * (A(1) / norm);
                }
            }
            const A unit_sum = block_sum(partial, shared);
            if (threadIdx.x == 0) {
                unit_sums[task * dims + d] = unit_sum;
            }
        }
    }
}

// grad_u = scales[n, k] * (e_u - mean_units[n, k]) inside instance k, 0 elsewhere; one work item
// per pixel.
template <typename T>
__global__ void semiconv_loss_grad(const T* __restrict__ psi, const long long* __restrict__ labels,
                                   const acc_t<T>* __restrict__ means, const acc_t<T>* __restrict__ scales,
                                   const acc_t<T>* __restrict__ mean_units, T* __restrict__ grad,
                                   PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long k_max) {
    using A = acc_t<T>;
    const long long plane = height * width;
    for (long long item = grid_stride_begin(); item < batch * plane; item += grid_stride_step()) {
        const long long n = item / plane;
        const long long p = item - n * plane;
        const long long k = labels[item];
        const T* image = psi + n * dims * plane;
        T* image_grad = grad + n * dims * plane;
        if (k < 1 || k > k_max) {
            for (long long d = 0; d < dims; ++d) {
                image_grad[d * plane + p] = from_acc<T>(A(0));
            }
            continue;
        }
        const long long stats = n * k_max + k - 1;
        const A* mean = means + stats * dims;
        const A norm = embedding_distance(image, plane, dims, p, width, sy, sx, mean);
        for (long long d = 0; d < dims; ++d) {
            const A unit = norm != A(0) ? (embedding_value(image, plane, d, p, width, sy, sx) - mean[d]) / norm : A(0);
            image_grad[d * plane + p] = from_acc<T>(scales[stats] * (unit - mean_units[stats * dims + d]));
        }
    }
}

// out [N, K, H, W]: exp(-d / sigma) (kernel 0, laplacian) or exp(-d^2 / (2 sigma^2)) (1,
// gaussian); one work item per output element.
template <typename T>
__global__ void semiconv_affinity(const T* __restrict__ psi, const T* __restrict__ centers,
                                  const acc_t<T>* __restrict__ sigma, T* __restrict__ out,
                                  PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long k_max, const int kernel) {
    using A = acc_t<T>;
    const long long plane = height * width;
    for (long long item = grid_stride_begin(); item < batch * k_max * plane; item += grid_stride_step()) {
        const long long task = item / plane;
        const long long n = task / k_max;
        const long long p = item - task * plane;
        const A dist = embedding_distance(psi + n * dims * plane, plane, dims, p, width, sy, sx, centers + task * dims);
        const A s = sigma[task];
        out[item] = from_acc<T>(pydeform::is_laplacian(kernel) ? exp(-dist / s) : exp(-(dist * dist) / (A(2) * s * s)));
    }
}

// grad psi_u = sum over k (in order) of d A[k, u] / d psi_u; one work item per pixel.
template <typename T>
__global__ void semiconv_affinity_grad_psi(const T* __restrict__ grad_out, const T* __restrict__ psi,
                                           const T* __restrict__ centers, const acc_t<T>* __restrict__ sigma,
                                           T* __restrict__ grad_psi, PYDEFORM_SEMICONV_GEOMETRY_PARAMS,
                                           const long long k_max, const int kernel) {
    using A = acc_t<T>;
    const long long plane = height * width;
    for (long long item = grid_stride_begin(); item < batch * plane; item += grid_stride_step()) {
        const long long n = item / plane;
        const long long p = item - n * plane;
        const T* image = psi + n * dims * plane;
        for (long long d = 0; d < dims; ++d) {
            A total = A(0);
            for (long long k = 0; k < k_max; ++k) {
                const long long task = n * k_max + k;
                const T* center = centers + task * dims;
                const auto factor = pydeform::affinity_factor(load_acc(grad_out + task * plane + p), image, plane, dims, p,
                                                              width, sy, sx, center, sigma[task], kernel);
                total += factor.f * (embedding_value(image, plane, d, p, width, sy, sx) - load_acc(center + d));
            }
            grad_psi[n * dims * plane + d * plane + p] = from_acc<T>(total);
        }
    }
}

// One block per (image, center): the center's gradient (grad_centers [N, K, D]) and sigma's
// (grad_sigma [N, K] in the accumulation type), summed over the pixels.
template <typename T>
__global__ void semiconv_affinity_grad_centers(const T* __restrict__ grad_out, const T* __restrict__ psi,
                                               const T* __restrict__ centers, const acc_t<T>* __restrict__ sigma,
                                               T* __restrict__ grad_centers, acc_t<T>* __restrict__ grad_sigma,
                                               PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long k_max,
                                               const int kernel) {
    using A = acc_t<T>;
    __shared__ A shared[kThreadsPerBlock];
    const long long plane = height * width;
    for (long long task = blockIdx.x; task < batch * k_max; task += gridDim.x) {
        const long long n = task / k_max;
        const T* image = psi + n * dims * plane;
        const T* center = centers + task * dims;
        const A s = sigma[task];
        for (long long d = 0; d < dims; ++d) {
            A partial = A(0);
            for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
                const auto factor = pydeform::affinity_factor(load_acc(grad_out + task * plane + p), image, plane, dims, p,
                                                              width, sy, sx, center, s, kernel);
                partial -= factor.f * (embedding_value(image, plane, d, p, width, sy, sx) - load_acc(center + d));
            }
            const A total = block_sum(partial, shared);
            if (threadIdx.x == 0) {
                grad_centers[task * dims + d] = from_acc<T>(total);
            }
        }
        A partial = A(0);
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            const A g = load_acc(grad_out + task * plane + p);
            const auto factor = pydeform::affinity_factor(g, image, plane, dims, p, width, sy, sx, center, s, kernel);
            partial += pydeform::is_laplacian(kernel) ? g * factor.a * factor.dist / (s * s)
                                                      : g * factor.a * factor.dist * factor.dist / (s * s * s);
        }
        const A total = block_sum(partial, shared);
        if (threadIdx.x == 0) {
            grad_sigma[task] = total;
        }
    }
}

// One block per region: the seed (seeds [R, D]; softmax weights [R, h, w]), then
// out = scores - ||psi_u - seed|| / sigma.
template <typename T>
__global__ void semiconv_seeded(const T* __restrict__ scores, const T* __restrict__ psi,
                                const acc_t<T>* __restrict__ sigma, acc_t<T>* __restrict__ seeds,
                                acc_t<T>* __restrict__ weights, T* __restrict__ out,
                                PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const int softmax) {
    using A = acc_t<T>;
    __shared__ A shared_values[kThreadsPerBlock];
    __shared__ long long shared_indices[kThreadsPerBlock];
    const long long plane = height * width;
    for (long long r = blockIdx.x; r < batch; r += gridDim.x) {
        const T* image = psi + r * dims * plane;
        A* seed = seeds + r * dims;
        pydeform::region_seed(scores + r * plane, image, seed, weights + r * plane, dims, height, width, sy, sx,
                              softmax, shared_values, shared_indices);
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            const A dist = embedding_distance(image, plane, dims, p, width, sy, sx, seed);
            out[r * plane + p] = from_acc<T>(load_acc(scores + r * plane + p) - dist / sigma[r]);
        }
        __syncthreads();  // every thread is done with this region before the shared arrays are reused
    }
}

// One block per region: the direct gradients of scores, psi and sigma (grad_sigma [R] in the
// accumulation type), then the seed's gradient (grad_seeds [R, D]) sent back to the seed pixel's
// psi (argmax) or to every pixel's psi and score (softmax).
template <typename T>
__global__ void semiconv_seeded_grad(const T* __restrict__ grad_out, const T* __restrict__ scores,
                                     const T* __restrict__ psi, const acc_t<T>* __restrict__ sigma,
                                     acc_t<T>* __restrict__ seeds, acc_t<T>* __restrict__ weights,
                                     acc_t<T>* __restrict__ grad_seeds, T* __restrict__ grad_scores,
                                     T* __restrict__ grad_psi, acc_t<T>* __restrict__ grad_sigma,
                                     PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const int softmax) {
    using A = acc_t<T>;
    __shared__ A shared_values[kThreadsPerBlock];
    __shared__ long long shared_indices[kThreadsPerBlock];
    const long long plane = height * width;
    for (long long r = blockIdx.x; r < batch; r += gridDim.x) {
        const T* image = psi + r * dims * plane;
        T* image_grad = grad_psi + r * dims * plane;
        A* seed = seeds + r * dims;
        A* grad_seed = grad_seeds + r * dims;
        const A* region_weights = weights + r * plane;
        const A s = sigma[r];
        const long long best = pydeform::region_seed(scores + r * plane, image, seed, weights + r * plane, dims, height,
                                                     width, sy, sx, softmax, shared_values, shared_indices);
        A partial = A(0);
        for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
            const A g = load_acc(grad_out + r * plane + p);
            const A dist = embedding_distance(image, plane, dims, p, width, sy, sx, seed);
            grad_scores[r * plane + p] = from_acc<T>(g);
            partial += g * dist;
            for (long long d = 0; d < dims; ++d) {
                const A unit = dist != A(0) ? (embedding_value(image, plane, d, p, width, sy, sx) - seed[d]) / dist : A(0);
                image_grad[d * plane + p] = from_acc<T>(-g * unit / s);
            }
        }
        const A total = block_sum(partial, shared_values);
        for (long long d = 0; d < dims; ++d) {
            partial = A(0);
            for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
                const A dist = embedding_distance(image, plane, dims, p, width, sy, sx, seed);
                if (dist != A(0)) {
                    partial += load_acc(grad_out + r * plane + p) *
                               ((embedding_value(image, plane, d, p, width, sy, sx) - seed[d]) / dist) / s;
                }
            }
            const A seed_grad = block_sum(partial, shared_values);
            if (threadIdx.x == 0) {
                grad_seed[d] = seed_grad;
            }
        }
        if (threadIdx.x == 0) {
            grad_sigma[r] = total / (s * s);
        }
        __syncthreads();  // grad_seed, written by thread 0, is read by every thread below
        if (!softmax) {
            if (threadIdx.x == 0) {
                for (long long d = 0; d < dims; ++d) {
                    image_grad[d * plane + best] = from_acc<T>(to_acc(image_grad[d * plane + best]) + grad_seed[d]);
                }
            }
        } else {
            for (long long p = threadIdx.x; p < plane; p += blockDim.x) {
                const A w = region_weights[p];
                A dot = A(0);
                for (long long d = 0; d < dims; ++d) {
                    image_grad[d * plane + p] = from_acc<T>(to_acc(image_grad[d * plane + p]) + w * grad_seed[d]);
                    dot += (embedding_value(image, plane, d, p, width, sy, sx) - seed[d]) * grad_seed[d];
                }
                grad_scores[r * plane + p] = from_acc<T>(to_acc(grad_scores[r * plane + p]) + w * dot);
            }
        }
        __syncthreads();
    }
}

// counts int32 [N, out_h, out_w], zeroed before the launch: every foreground pixel adds 1 at
// (round(psi_0), round(psi_1)) when inside (NaN never is); one work item per pixel.
template <typename T>
__global__ void semiconv_votes(const T* __restrict__ psi, const bool* __restrict__ foreground,
                               int* __restrict__ counts, PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long out_h,
                               const long long out_w) {
    using A = acc_t<T>;
    const long long plane = height * width;
    for (long long item = grid_stride_begin(); item < batch * plane; item += grid_stride_step()) {
        if (!foreground[item]) {
            continue;
        }
        const long long n = item / plane;
        const long long p = item - n * plane;
        const T* image = psi + n * dims * plane;
        const A vy = pydeform::round_half_away(embedding_value(image, plane, 0, p, width, sy, sx));
        const A vx = pydeform::round_half_away(embedding_value(image, plane, 1, p, width, sy, sx));
        if (vy >= A(0) && vy < static_cast<A>(out_h) && vx >= A(0) && vx < static_cast<A>(out_w)) {
            atomicAdd(counts + (n * out_h + static_cast<long long>(vy)) * out_w + static_cast<long long>(vx), 1);
        }
    }
}

// labels int32 [N, H, W]: 1 + the nearest center (lowest k on ties, NaN distances skipped) within
// max_distance at a foreground pixel, else 0; one work item per pixel.
template <typename T>
__global__ void semiconv_assign(const T* __restrict__ psi, const bool* __restrict__ foreground,
                                const T* __restrict__ centers, int* __restrict__ labels,
                                PYDEFORM_SEMICONV_GEOMETRY_PARAMS, const long long k_max,
                                const acc_t<T> max_distance) {
    using A = acc_t<T>;
    const long long plane = height * width;
    for (long long item = grid_stride_begin(); item < batch * plane; item += grid_stride_step()) {
        const long long n = item / plane;
        const long long p = item - n * plane;
        int label = 0;
        if (foreground[item]) {
            A best = A(0);
            long long best_k = -1;
            for (long long k = 0; k < k_max; ++k) {
                const A dist = embedding_distance(psi + n * dims * plane, plane, dims, p, width, sy, sx,
                                                  centers + (n * k_max + k) * dims);
                if (dist == dist && (best_k < 0 || dist < best)) {
                    best = dist;
                    best_k = k;
                }
            }
            if (best_k >= 0 && best <= max_distance) {
                label = static_cast<int>(best_k + 1);
            }
        }
        labels[item] = label;
    }
}
