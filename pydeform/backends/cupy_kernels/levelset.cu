// Level-set segmentation (docs/levelset.md): the curvature operators SI and IS, the MorphACWE
// means and attachment, the MorphGAC balloon and attachment, and the Chan-Vese step with the
// sums of the next iteration.
//
// Layout: a batch of B images of one shape S, 2-D [H, W] or 3-D [D, H, W] (a 2-D image is the
// one plane of depth 1 with `volume` 0); images [B, *S]; level sets uint8 [B, *(S + 2)] with a
// border of zeros one pixel wide that no kernel writes, so erosion and dilation read 0 outside
// the image with no bounds test. Every step is Jacobi: a kernel reads one level-set buffer and
// writes the other. The element-wise kernels take one thread per pixel of the whole batch (the
// batch is just more of the grid), in grid-stride loops.
//
// Sums are deterministic: an image's rows are cut into chunks of a fixed number of rows; one
// block per (image, chunk) adds its pixels (each thread strides by blockDim.x, then a tree of
// fixed shape in shared memory), and one block per image adds the chunks' partial sums the same
// way. No float atomics, so the sums, and the level sets that follow from them, are identical run
// to run. The attachments multiply and add with the _rn intrinsics, which are never contracted
// into an FMA: the MorphACWE attachment then rounds as NumPy does (scikit-image's level sets
// exactly, for integer-valued images), the MorphGAC one too (for any gimage). Every loop strides
// by blockDim.x and gridDim.x, so the kernels are also correct as one block of one thread (the
// host shim).

#include "common.cuh"

namespace pydeform {

// Image geometry of a launch: batch, depth (1 for 2-D images), height, width and whether the
// images are volumes (3-D).
#define PYDEFORM_LEVELSET_GEOMETRY_PARAMS                                                         \
    const long long batch, const long long depth, const long long height, const long long width, \
        const int volume

// The level-set arithmetic that must round like NumPy's: a product and a sum rounded one at a
// time, never fused.
__device__ __forceinline__ double mul_rn(const double a, const double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float mul_rn(const float a, const float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double add_rn(const double a, const double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float add_rn(const float a, const float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(const double a, const double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float sub_rn(const float a, const float b) { return __fsub_rn(a, b); }

// Pixel (b, z, y, x) of the batch, from its index in [0, batch * depth * height * width).
struct Pixel {
    long long b, z, y, x;
};

__device__ __forceinline__ Pixel pixel_at(long long index, const long long depth, const long long height,
                                          const long long width) {
    Pixel p;
    p.x = index % width;
    index /= width;
    p.y = index % height;
    index /= height;
    p.z = index % depth;
    p.b = index / depth;
    return p;
}

// Offset of pixel p in a padded level set [B, *(S + 2)].
__device__ __forceinline__ long long padded_offset(const Pixel& p, const long long depth, const long long height,
                                                   const long long width, const int volume) {
    const long long planes = volume ? depth + 2 : 1;
    return ((p.b * planes + p.z + volume) * (height + 2) + p.y + 1) * (width + 2) + p.x + 1;
}

// Pixel i of the batch in a padded level set: its coordinates, its offset and the strides along
// y and z (x: 1); along z 0 for 2-D images, whose only neighbours along z are the pixel itself.
struct Site {
    Pixel p;
    long long offset, sy, sz;
};

__device__ __forceinline__ Site site_at(const long long i, const long long depth, const long long height,
                                        const long long width, const int volume) {
    const Pixel p = pixel_at(i, depth, height, width);
    return {p, padded_offset(p, depth, height, width, volume), width + 2, volume ? (height + 2) * (width + 2) : 0};
}

// SI (dilate 0: the largest erosion by the line elements through the centre) or IS (dilate 1:
// the smallest dilation) at the centre c of a padded 2-D level set with row stride sy.
__device__ __forceinline__ unsigned char curvature_2d(const unsigned char* c, const long long sy,
                                                      const int dilate) {
    const unsigned char* up = c - sy;
    const unsigned char* down = c + sy;
    if (dilate) {
        return c[0] | ((up[-1] | down[1]) & (up[0] | down[0]) & (up[1] | down[-1]) & (c[-1] | c[1]));
    }
    return c[0] & ((up[-1] & down[1]) | (up[0] & down[0]) | (up[1] & down[-1]) | (c[-1] & c[1]));
}

// The same in 3-D with the 9 planes of 3x3 voxels through the centre; vABC is the voxel at offset
// (A - 1, B - 1, C - 1) in (z, y, x). Every plane contains the centre, so SI = centre & (any
// plane's other 8 all set) and IS = centre | (every plane has one of its other 8 set).
__device__ __forceinline__ unsigned char curvature_3d(const unsigned char* c, const long long sz, const long long sy,
                                                      const int dilate) {
    const unsigned char *r0 = c - sz - sy, *r1 = c - sz, *r2 = c - sz + sy;
    const unsigned char *r3 = c - sy, *r5 = c + sy;
    const unsigned char *r6 = c + sz - sy, *r7 = c + sz, *r8 = c + sz + sy;
    const unsigned char v000 = r0[-1], v001 = r0[0], v002 = r0[1];
    const unsigned char v010 = r1[-1], v011 = r1[0], v012 = r1[1];
    const unsigned char v020 = r2[-1], v021 = r2[0], v022 = r2[1];
    const unsigned char v100 = r3[-1], v101 = r3[0], v102 = r3[1];
    const unsigned char v110 = c[-1], v112 = c[1];
    const unsigned char v120 = r5[-1], v121 = r5[0], v122 = r5[1];
    const unsigned char v200 = r6[-1], v201 = r6[0], v202 = r6[1];
    const unsigned char v210 = r7[-1], v211 = r7[0], v212 = r7[1];
    const unsigned char v220 = r8[-1], v221 = r8[0], v222 = r8[1];
    if (dilate) {
        return c[0] | ((v001 | v011 | v021 | v101 | v121 | v201 | v211 | v221) &
                       (v010 | v011 | v012 | v110 | v112 | v210 | v211 | v212) &
                       (v100 | v101 | v102 | v110 | v112 | v120 | v121 | v122) &
                       (v000 | v011 | v022 | v100 | v122 | v200 | v211 | v222) &
                       (v002 | v011 | v020 | v102 | v120 | v202 | v211 | v220) &
                       (v000 | v101 | v202 | v010 | v212 | v020 | v121 | v222) &
                       (v002 | v101 | v200 | v012 | v210 | v022 | v121 | v220) &
                       (v000 | v110 | v220 | v001 | v221 | v002 | v112 | v222) &
                       (v020 | v110 | v200 | v021 | v201 | v022 | v112 | v202));
    }
    return c[0] & ((v001 & v011 & v021 & v101 & v121 & v201 & v211 & v221) |
                   (v010 & v011 & v012 & v110 & v112 & v210 & v211 & v212) |
                   (v100 & v101 & v102 & v110 & v112 & v120 & v121 & v122) |
                   (v000 & v011 & v022 & v100 & v122 & v200 & v211 & v222) |
                   (v002 & v011 & v020 & v102 & v120 & v202 & v211 & v220) |
                   (v000 & v101 & v202 & v010 & v212 & v020 & v121 & v222) |
                   (v002 & v101 & v200 & v012 & v210 & v022 & v121 & v220) |
                   (v000 & v110 & v220 & v001 & v221 & v002 & v112 & v222) |
                   (v020 & v110 & v200 & v021 & v201 & v022 & v112 & v202));
}

// np.gradient of a level set along one axis at index i of n >= 2 (central inside, one-sided at
// the ends), from the centre c and the stride along the axis: (after - before) / distance,
// exact (the distance is 1 or 2).
template <typename A>
__device__ __forceinline__ A level_slope(const unsigned char* c, const long long stride, const long long i,
                                         const long long n) {
    const long long before = i > 0 ? -stride : 0;
    const long long after = i < n - 1 ? stride : 0;
    const A difference = static_cast<A>(static_cast<int>(c[after]) - static_cast<int>(c[before]));
    return after - before == 2 * stride ? difference * A(0.5) : difference;
}

// 1 where aux > 0, 0 where aux < 0, else (0 or NaN) the old value.
template <typename A>
__device__ __forceinline__ unsigned char select_sign(const A aux, const unsigned char old) {
    return aux > A(0) ? 1 : (aux < A(0) ? 0 : old);
}

// The N sums of every thread's `values`, returned in `values` to all threads of the block: one
// tree over the threads of fixed shape for all N (halving the active count, the upper half added
// onto the lower), so the order of the additions depends only on blockDim.x.
template <typename A, int N>
__device__ void block_sums(A (&values)[N], A (&shared)[N][kThreadsPerBlock]) {
    for (int k = 0; k < N; ++k) {
        shared[k][threadIdx.x] = values[k];
    }
    __syncthreads();
    for (unsigned int active = blockDim.x; active > 1;) {
        const unsigned int half = (active + 1) / 2;
        if (threadIdx.x < active - half) {
            for (int k = 0; k < N; ++k) {
                shared[k][threadIdx.x] += shared[k][threadIdx.x + half];
            }
        }
        __syncthreads();
        active = half;
    }
    for (int k = 0; k < N; ++k) {
        values[k] = shared[k][0];
    }
    __syncthreads();  // before the next call overwrites the shared sums
}

// The pixels [first, last) of chunk c (of rows_per_chunk rows) of an image of `rows` rows.
struct Chunk {
    long long first, last;
};

__device__ __forceinline__ Chunk chunk_pixels(const long long c, const long long rows_per_chunk,
                                              const long long rows, const long long width) {
    const long long end_row = (c + 1) * rows_per_chunk < rows ? (c + 1) * rows_per_chunk : rows;
    return {c * rows_per_chunk * width, end_row * width};
}

// The totals of image b's N sums over its chunks (partial [batch * chunks, N]), to every thread
// of the block: the threads stride over the chunks, then block_sums.
template <typename A, int N>
__device__ __forceinline__ void chunk_totals(const A* __restrict__ partial, const long long b,
                                             const long long chunks, A (&totals)[N],
                                             A (&shared)[N][kThreadsPerBlock]) {
    for (int k = 0; k < N; ++k) {
        totals[k] = A(0);
    }
    for (long long c = threadIdx.x; c < chunks; c += blockDim.x) {
        for (int k = 0; k < N; ++k) {
            totals[k] += partial[(b * chunks + c) * N + k];
        }
    }
    block_sums(totals, shared);
}

}  // namespace pydeform

using pydeform::acc_t;
using pydeform::add_rn;
using pydeform::block_sums;
using pydeform::Chunk;
using pydeform::chunk_pixels;
using pydeform::chunk_totals;
using pydeform::curvature_2d;
using pydeform::curvature_3d;
using pydeform::grid_stride_begin;
using pydeform::grid_stride_step;
using pydeform::kThreadsPerBlock;
using pydeform::level_slope;
using pydeform::load_acc;
using pydeform::mul_rn;
using pydeform::select_sign;
using pydeform::Site;
using pydeform::site_at;
using pydeform::sub_rn;

// dst = SI(src) (dilate 0) or IS(src) (dilate 1) on every pixel of the batch. T (the image type)
// names the instance only.
template <typename T>
__global__ void levelset_curvature(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                   PYDEFORM_LEVELSET_GEOMETRY_PARAMS, const int dilate) {
    for (long long i = grid_stride_begin(); i < batch * depth * height * width; i += grid_stride_step()) {
        const Site s = site_at(i, depth, height, width, volume);
        const unsigned char* c = src + s.offset;
        dst[s.offset] = volume ? curvature_3d(c, s.sz, s.sy, dilate) : curvature_2d(c, s.sy, dilate);
    }
}

// MorphACWE's sums: partial[b * chunks + c] = (sum I (1 - u), sum 1 - u, sum I u, sum u) over
// chunk c of image b. The products by 0 or 1 keep NaN and infinities as NumPy's sums do.
template <typename T>
__global__ void levelset_acwe_partials(const unsigned char* __restrict__ u, const T* __restrict__ image,
                                       acc_t<T>* __restrict__ partial, PYDEFORM_LEVELSET_GEOMETRY_PARAMS,
                                       const long long rows_per_chunk, const long long chunks) {
    using A = acc_t<T>;
    __shared__ A shared[4][kThreadsPerBlock];
    const long long plane = depth * height * width;
    for (long long job = blockIdx.x; job < batch * chunks; job += gridDim.x) {
        const long long b = job / chunks;
        const Chunk chunk = chunk_pixels(job - b * chunks, rows_per_chunk, depth * height, width);
        A sums[4] = {A(0), A(0), A(0), A(0)};
        for (long long p = chunk.first + threadIdx.x; p < chunk.last; p += blockDim.x) {
            const long long i = b * plane + p;
            const A inside = u[site_at(i, depth, height, width, volume).offset];
            const A value = load_acc(image + i);
            sums[0] += value * (A(1) - inside);
            sums[1] += A(1) - inside;
            sums[2] += value * inside;
            sums[3] += inside;
        }
        block_sums(sums, shared);
        if (threadIdx.x == 0) {
            for (int k = 0; k < 4; ++k) {
                partial[job * 4 + k] = sums[k];
            }
        }
    }
}

// means[b] = (c0, c1) = (sum I (1 - u) / (sum 1 - u + 1e-8), sum I u / (sum u + 1e-8)) from the
// chunks' partial sums of image b, one block per image.
template <typename T>
__global__ void levelset_acwe_means(const acc_t<T>* __restrict__ partial, acc_t<T>* __restrict__ means,
                                    const long long batch, const long long chunks) {
    using A = acc_t<T>;
    __shared__ A shared[4][kThreadsPerBlock];
    for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
        A totals[4];
        chunk_totals(partial, b, chunks, totals, shared);
        if (threadIdx.x == 0) {
            means[b * 2] = totals[0] / (totals[1] + A(1e-8));
            means[b * 2 + 1] = totals[2] / (totals[3] + A(1e-8));
        }
    }
}

// MorphACWE's attachment: where u has a gradient (np.gradient != 0 on an axis), u becomes 1 if
// lambda1 (I - c1)^2 < lambda2 (I - c0)^2 and 0 if greater, as scikit-image computes it:
// |grad u| summed over the axes times that difference, rounded step by step.
template <typename T>
__global__ void levelset_acwe_attach(const unsigned char* __restrict__ src, const T* __restrict__ image,
                                     const acc_t<T>* __restrict__ means, const acc_t<T> lambda1,
                                     const acc_t<T> lambda2, unsigned char* __restrict__ dst,
                                     PYDEFORM_LEVELSET_GEOMETRY_PARAMS) {
    using A = acc_t<T>;
    for (long long i = grid_stride_begin(); i < batch * depth * height * width; i += grid_stride_step()) {
        const Site s = site_at(i, depth, height, width, volume);
        const unsigned char* c = src + s.offset;
        // the slopes are 0, 0.5 or 1 in size: their sum is exact in any order
        const A abs_du = fabs(level_slope<A>(c, s.sz, s.p.z, depth)) + fabs(level_slope<A>(c, s.sy, s.p.y, height)) +
                         fabs(level_slope<A>(c, 1, s.p.x, width));
        const A value = load_acc(image + i);
        const A inside = value - means[s.p.b * 2 + 1];
        const A outside = value - means[s.p.b * 2];
        const A aux = mul_rn(abs_du, sub_rn(mul_rn(lambda1, mul_rn(inside, inside)),
                                            mul_rn(lambda2, mul_rn(outside, outside))));
        dst[s.offset] = select_sign(-aux, c[0]);
    }
}

// MorphGAC's balloon: dst = the 3x3 (3x3x3) box dilation (grow) or erosion of src where
// gimage > limit[b], src elsewhere.
template <typename T>
__global__ void levelset_gac_balloon(const unsigned char* __restrict__ src, const T* __restrict__ gimage,
                                     const acc_t<T>* __restrict__ limit, unsigned char* __restrict__ dst,
                                     PYDEFORM_LEVELSET_GEOMETRY_PARAMS, const int grow) {
    const long long z_reach = volume ? 1 : 0;
    for (long long i = grid_stride_begin(); i < batch * depth * height * width; i += grid_stride_step()) {
        const Site s = site_at(i, depth, height, width, volume);
        const unsigned char* c = src + s.offset;
        unsigned char box = grow ? 0 : 1;
        for (long long dz = -z_reach; dz <= z_reach; ++dz) {
            for (long long dy = -1; dy <= 1; ++dy) {
                const unsigned char* row = c + dz * s.sz + dy * s.sy;
                box = grow ? (box | row[-1] | row[0] | row[1]) : (box & row[-1] & row[0] & row[1]);
            }
        }
        dst[s.offset] = load_acc(gimage + i) > limit[s.p.b] ? box : c[0];
    }
}

// MorphGAC's attachment: u becomes 1 where sum_i gradient_i(gimage) gradient_i(u) > 0 and 0
// where < 0, the products added in axis order; gradient [B, ndim, *S].
template <typename T>
__global__ void levelset_gac_attach(const unsigned char* __restrict__ src, const T* __restrict__ gradient,
                                    unsigned char* __restrict__ dst, PYDEFORM_LEVELSET_GEOMETRY_PARAMS) {
    using A = acc_t<T>;
    const long long plane = depth * height * width;
    const long long ndim = volume ? 3 : 2;
    for (long long i = grid_stride_begin(); i < batch * plane; i += grid_stride_step()) {
        const Site s = site_at(i, depth, height, width, volume);
        const unsigned char* c = src + s.offset;
        const T* g = gradient + s.p.b * ndim * plane + (i - s.p.b * plane);
        A aux = mul_rn(load_acc(g + (ndim - 2) * plane), level_slope<A>(c, s.sy, s.p.y, height));
        if (volume) {
            aux = add_rn(mul_rn(load_acc(g), level_slope<A>(c, s.sz, s.p.z, depth)), aux);
        }
        aux = add_rn(aux, mul_rn(load_acc(g + (ndim - 1) * plane), level_slope<A>(c, 1, s.p.x, width)));
        dst[s.offset] = select_sign(aux, c[0]);
    }
}

namespace pydeform {

// Adds pixel value f with level-set value phi (and its change since the last step) to the
// Chan-Vese sums (sum f H, sum H, sum f (1 - H), sum 1 - H, sum change^2), H = phi > 0.
template <typename A>
__device__ __forceinline__ void add_region(A (&sums)[5], const A value, const A phi, const A change) {
    const A inside = phi > A(0) ? A(1) : A(0);
    sums[0] += value * inside;
    sums[1] += inside;
    sums[2] += value * (A(1) - inside);
    sums[3] += A(1) - inside;
    sums[4] += change * change;
}

// One Jacobi step of Chan-Vese's phi at (y, x) of an image (phi and f [H, W]) with edge-replicated
// differences: curvature term semi-implicit, delta(phi) = 1 / (1 + phi^2).
template <typename T>
__device__ __forceinline__ acc_t<T> chan_vese_pixel(const T* __restrict__ phi, const T* __restrict__ image,
                                                    const long long y, const long long x, const long long height,
                                                    const long long width, const acc_t<T> c1, const acc_t<T> c2,
                                                    const acc_t<T> mu, const acc_t<T> lambda1,
                                                    const acc_t<T> lambda2, const acc_t<T> dt) {
    using A = acc_t<T>;
    const long long above = (y > 0 ? y - 1 : y) * width, below = (y < height - 1 ? y + 1 : y) * width;
    const long long left = x > 0 ? x - 1 : x, right = x < width - 1 ? x + 1 : x;
    const A centre = load_acc(phi + y * width + x);
    const A r = load_acc(phi + y * width + right), l = load_acc(phi + y * width + left);
    const A d = load_acc(phi + below + x), u = load_acc(phi + above + x);
    const A dx_mid = (r - l) / A(2), dy_mid = (d - u) / A(2);
    const A k1 = A(1) / sqrt(A(1e-16) + (r - centre) * (r - centre) + dy_mid * dy_mid);
    const A k2 = A(1) / sqrt(A(1e-16) + (centre - l) * (centre - l) + dy_mid * dy_mid);
    const A k3 = A(1) / sqrt(A(1e-16) + dx_mid * dx_mid + (d - centre) * (d - centre));
    const A k4 = A(1) / sqrt(A(1e-16) + dx_mid * dx_mid + (centre - u) * (centre - u));
    const A curvature = r * k1 + l * k2 + d * k3 + u * k4;
    const A delta = A(1) / (A(1) + centre * centre);
    const A value = load_acc(image + y * width + x);
    const A force = -lambda1 * ((value - c1) * (value - c1)) + lambda2 * ((value - c2) * (value - c2));
    return (centre + dt * delta * (mu * curvature + force)) / (A(1) + mu * dt * delta * (k1 + k2 + k3 + k4));
}

}  // namespace pydeform

using pydeform::add_region;
using pydeform::chan_vese_pixel;

// Chan-Vese's sums of phi [B, H, W] (no change): partial[b * chunks + c] = the 5 sums of
// add_region over chunk c of image b.
template <typename T>
__global__ void levelset_chan_vese_sums(const T* __restrict__ phi, const T* __restrict__ image,
                                        acc_t<T>* __restrict__ partial, const long long batch,
                                        const long long height, const long long width,
                                        const long long rows_per_chunk, const long long chunks) {
    using A = acc_t<T>;
    __shared__ A shared[5][kThreadsPerBlock];
    for (long long job = blockIdx.x; job < batch * chunks; job += gridDim.x) {
        const long long b = job / chunks;
        const Chunk chunk = chunk_pixels(job - b * chunks, rows_per_chunk, height, width);
        A sums[5] = {A(0), A(0), A(0), A(0), A(0)};
        for (long long p = chunk.first + threadIdx.x; p < chunk.last; p += blockDim.x) {
            const long long i = b * height * width + p;
            add_region(sums, load_acc(image + i), load_acc(phi + i), A(0));
        }
        block_sums(sums, shared);
        if (threadIdx.x == 0) {
            for (int k = 0; k < 5; ++k) {
                partial[job * 5 + k] = sums[k];
            }
        }
    }
}

// One Chan-Vese step for the images b with active[b] set: new_phi = the step of phi with the
// means c1, c2 of stats[b], partial[b * chunks + c] = the sums of add_region over chunk c of
// new_phi, with the squared changes.
template <typename T>
__global__ void levelset_chan_vese_step(const T* __restrict__ phi, const T* __restrict__ image,
                                        const acc_t<T>* __restrict__ stats, const unsigned char* __restrict__ active,
                                        T* __restrict__ new_phi, acc_t<T>* __restrict__ partial,
                                        const long long batch, const long long height, const long long width,
                                        const long long rows_per_chunk, const long long chunks, const acc_t<T> mu,
                                        const acc_t<T> lambda1, const acc_t<T> lambda2, const acc_t<T> dt) {
    using A = acc_t<T>;
    __shared__ A shared[5][kThreadsPerBlock];
    for (long long job = blockIdx.x; job < batch * chunks; job += gridDim.x) {
        const long long b = job / chunks;
        if (!active[b]) {
            continue;  // the whole block skips: no thread waits at a barrier below
        }
        const Chunk chunk = chunk_pixels(job - b * chunks, rows_per_chunk, height, width);
        const long long plane = height * width;
        const T* image_phi = phi + b * plane;
        const T* values = image + b * plane;
        A sums[5] = {A(0), A(0), A(0), A(0), A(0)};
        for (long long p = chunk.first + threadIdx.x; p < chunk.last; p += blockDim.x) {
            const A updated = chan_vese_pixel(image_phi, values, p / width, p % width, height, width, stats[b * 3],
                                              stats[b * 3 + 1], mu, lambda1, lambda2, dt);
            new_phi[b * plane + p] = pydeform::from_acc<T>(updated);
            add_region(sums, load_acc(values + p), updated, updated - load_acc(image_phi + p));
        }
        block_sums(sums, shared);
        if (threadIdx.x == 0) {
            for (int k = 0; k < 5; ++k) {
                partial[job * 5 + k] = sums[k];
            }
        }
    }
}

// stats[b] = (c1, c2, RMS change) from the chunks' partial sums of image b (of `pixels` pixels),
// for every image b with active[b] set (every image when active is null); one block per image.
// A mean over no pixel is 0.
template <typename T>
__global__ void levelset_chan_vese_stats(const acc_t<T>* __restrict__ partial, const unsigned char* __restrict__ active,
                                         acc_t<T>* __restrict__ stats, const long long batch,
                                         const long long chunks, const acc_t<T> pixels) {
    using A = acc_t<T>;
    __shared__ A shared[5][kThreadsPerBlock];
    for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
        if (active != nullptr && !active[b]) {
            continue;
        }
        A totals[5];
        chunk_totals(partial, b, chunks, totals, shared);
        if (threadIdx.x == 0) {
            stats[b * 3] = totals[1] != A(0) ? totals[0] / totals[1] : totals[0];
            stats[b * 3 + 1] = totals[3] != A(0) ? totals[2] / totals[3] : totals[2];
            stats[b * 3 + 2] = sqrt(totals[4] / pixels);
        }
    }
}
