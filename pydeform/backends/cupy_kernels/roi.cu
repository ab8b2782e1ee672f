// RoI pooling (docs/roi.md), a forward and a backward kernel per family:
//   roi_align_*          roi_align, its max mode and ps_roi_align (position_sensitive)
//   roi_pool_*           roi_pool (max) and ps_roi_pool (position_sensitive, average)
//   deform_roi_pool_*    mmcv's DeformRoIPool, optional offset [K, 2, PH, PW] and mask [K, 1, PH, PW]
//   deform_psroi_pool_*  deformable PS RoI pooling, optional trans [K, 2*classes, part, part]
//
// One work item per output element (k, c, ph, pw) of [K, C_out, PH, PW], pw fastest. A forward
// item pools its bin and writes its output element; a backward item redoes its bin with the
// forward's code and scatters its grad_output element atomically into the zero-filled gradients
// (accumulation type). rois is [K, 5] rows (batch_index, x1, y1, x2, y2) in the accumulation type.
// A bin may hold any number of samples (adaptive sampling of a large roi), so samples are
// visited one at a time and never stored. Bilinear sampling is rule B (border-clamped).

#include "common.cuh"
#include "bilinear.cuh"
#include "contributions.cuh"

namespace pydeform {

// The most samples a bin takes along each axis (adaptive sampling's cap), and the bound on a
// valid roi's corners scaled to the feature map: MAX_SAMPLES_PER_AXIS and COORDINATE_LIMIT of
// pydeform/_rois.py, whose argument checks keep sampling_ratio and sample_per_part within the cap.
constexpr long long kMaxSamplesPerAxis = 1024;
constexpr double kCoordinateLimit = 16777216.0;  // 2**24

// input [batch, channels, height, width], output [K, channels_out, pooled_h, pooled_w].
struct RoIGeometry {
    long long batch, channels, height, width, pooled_h, pooled_w, channels_out;
};

// The geometry travels as flat scalars (what CuPy and ctypes can pass) in this order in every
// kernel of this file; the Python side builds the same list in one function.
#define PYDEFORM_ROI_GEOMETRY_PARAMS                                                            \
    const long long batch, const long long channels, const long long height,                   \
        const long long width, const long long pooled_h, const long long pooled_w,              \
        const long long channels_out
#define PYDEFORM_ROI_GEOMETRY                                                                   \
    pydeform::RoIGeometry { batch, channels, height, width, pooled_h, pooled_w, channels_out }

// A work item's output element and the box of its roi.
template <typename A>
struct RoIItem {
    long long roi, channel, ph, pw;
    bool valid;       // integer batch index in [0, batch), scaled box within the limit; else
                      // nothing is read
    long long image;  // the batch index
    A x1, y1, x2, y2;
};

// Whether a box corner times spatial_scale is within kCoordinateLimit (false for NaN and +-inf).
template <typename A>
__device__ __forceinline__ bool scaled_within_limit(const A value, const A spatial_scale) {
    const A scaled = value * spatial_scale;
    return scaled >= A(-kCoordinateLimit) && scaled <= A(kCoordinateLimit);
}

template <typename A>
__device__ __forceinline__ RoIItem<A> roi_item(const long long item, const RoIGeometry& geom,
                                               const A* __restrict__ rois, const A spatial_scale) {
    RoIItem<A> r;
    r.pw = item % geom.pooled_w;
    r.ph = (item / geom.pooled_w) % geom.pooled_h;
    r.channel = (item / (geom.pooled_w * geom.pooled_h)) % geom.channels_out;
    r.roi = item / (geom.pooled_w * geom.pooled_h * geom.channels_out);
    const A* box = rois + 5 * r.roi;
    const A image = load_acc(box);
    r.x1 = load_acc(box + 1);
    r.y1 = load_acc(box + 2);
    r.x2 = load_acc(box + 3);
    r.y2 = load_acc(box + 4);
    // A batch index that is not an integer in [0, batch) or a non-finite coordinate (rows the
    // Python side rejects unless the call skips the host check: on the GPU under pydeform.torch /
    // pydeform.jax, to avoid a synchronisation), or a scaled corner beyond kCoordinateLimit (a
    // finite box can overflow once scaled), makes the row invalid: nothing of the input is read
    // for it and its outputs are 0. Within the limit every bin size and sample count below is
    // finite and converts to an integer exactly. The index is compared before its conversion,
    // which could overflow.
    r.valid = image >= A(0) && image < A(geom.batch) && image == floor(image) &&
              scaled_within_limit(r.x1, spatial_scale) && scaled_within_limit(r.y1, spatial_scale) &&
              scaled_within_limit(r.x2, spatial_scale) && scaled_within_limit(r.y2, spatial_scale);
    r.image = r.valid ? static_cast<long long>(image) : 0;
    return r;
}

// output[item] = pool(item) for every work item, 0 where the roi is invalid.
template <typename T, typename Pool>
__device__ __forceinline__ void pool_each_output(const long long n_items, const RoIGeometry& geom,
                                                 const acc_t<T>* __restrict__ rois,
                                                 const acc_t<T> spatial_scale,
                                                 T* __restrict__ output, const Pool& pool) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<acc_t<T>> r = roi_item(item, geom, rois, spatial_scale);
        output[item] = from_acc<T>(r.valid ? pool(r) : acc_t<T>(0));
    }
}

// scatter(item, grad_output[item]) for every work item of a valid roi.
template <typename T, typename Scatter>
__device__ __forceinline__ void scatter_each_grad(const long long n_items, const RoIGeometry& geom,
                                                  const acc_t<T>* __restrict__ rois,
                                                  const acc_t<T> spatial_scale,
                                                  const T* __restrict__ grad_output,
                                                  const Scatter& scatter) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<acc_t<T>> r = roi_item(item, geom, rois, spatial_scale);
        if (r.valid) {
            scatter(r, load_acc(grad_output + item));
        }
    }
}

// Element offset of plane (image, channel) of an [batch, channels, height, width] array.
__device__ __forceinline__ long long plane_offset(const RoIGeometry& geom, const long long image,
                                                  const long long channel) {
    return (image * geom.channels + channel) * geom.height * geom.width;
}

// The input channel a bin reads: its output channel, or for position-sensitive pooling (R-FCN)
// that channel's slice for the bin's cell.
template <typename A>
__device__ __forceinline__ long long pooled_channel(const RoIGeometry& geom, const RoIItem<A>& r,
                                                    const bool position_sensitive) {
    return position_sensitive ? (r.channel * geom.pooled_h + r.ph) * geom.pooled_w + r.pw
                              : r.channel;
}

template <typename A>
__device__ __forceinline__ BilinearCorners<A> roi_corners(const RoIGeometry& geom, const A y,
                                                         const A x) {
    return border_clamped_corners(y, x, geom.height, geom.width);
}

// The samples of one bin: (start_y + (iy + phase) * step_y, start_x + (ix + phase) * step_x) for
// iy < grid_h, ix < grid_w.
template <typename A>
struct BinSamples {
    A start_y, start_x, step_y, step_x, phase;
    long long grid_h, grid_w;
};

template <typename A, typename Body>
__device__ __forceinline__ void for_each_sample(const BinSamples<A>& s, const Body& body) {
    for (long long iy = 0; iy < s.grid_h; ++iy) {
        const A y = s.start_y + (A(iy) + s.phase) * s.step_y;
        for (long long ix = 0; ix < s.grid_w; ++ix) {
            body(y, s.start_x + (A(ix) + s.phase) * s.step_x);
        }
    }
}

// roi_align's divisor: gh * gw, at least 1.
template <typename A>
__device__ __forceinline__ A sample_count(const BinSamples<A>& s) {
    return A(max(s.grid_h * s.grid_w, 1LL));
}

template <typename A, typename T>
__device__ __forceinline__ A sample_sum(const BinSamples<A>& samples, const T* plane,
                                        const RoIGeometry& geom) {
    A sum = A(0);
    for_each_sample(samples, [&](const A y, const A x) {
        sum += sample_corners(roi_corners(geom, y, x), plane);
    });
    return sum;
}

// Whether `value` takes over as the maximum from `best`: it is larger, or NaN while `best` is
// not. A NaN in a bin makes its maximum NaN (as torch's max_pool2d) and the first NaN is the
// arg-max (as NumPy's argmax), which the gradient reaches.
template <typename A>
__device__ __forceinline__ bool takes_over_max(const A value, const A best) {
    return best == best && !(value <= best);
}

template <typename A>
struct MaxSample {
    A value, y, x;
    bool found;  // false (value 0) for a bin without samples
};

// The largest sample of a bin and its position; on ties the first in (iy, ix) order, NaN over
// everything (takes_over_max). A sample outside the image takes part with its value 0.
template <typename A, typename T>
__device__ __forceinline__ MaxSample<A> max_sample(const BinSamples<A>& samples, const T* plane,
                                                   const RoIGeometry& geom) {
    MaxSample<A> best{A(0), A(0), A(0), false};
    for_each_sample(samples, [&](const A y, const A x) {
        const A value = sample_corners(roi_corners(geom, y, x), plane);
        if (!best.found || takes_over_max(value, best.value)) {
            best = MaxSample<A>{value, y, x, true};
        }
    });
    return best;
}

// A roi_align / deform_roi_pool box in feature-map coordinates.
template <typename A>
struct ScaledRoI {
    A start_y, start_x, height, width;
};

template <typename A>
__device__ __forceinline__ ScaledRoI<A> scaled_roi(const RoIItem<A>& r, const A spatial_scale,
                                                   const bool aligned) {
    const A half = aligned ? A(0.5) : A(0);
    ScaledRoI<A> roi;
    roi.start_x = r.x1 * spatial_scale - half;
    roi.start_y = r.y1 * spatial_scale - half;
    roi.width = (r.x2 * spatial_scale - half) - roi.start_x;
    roi.height = (r.y2 * spatial_scale - half) - roi.start_y;
    if (!aligned) {  // the legacy box is at least 1 x 1
        roi.width = max(roi.width, A(1));
        roi.height = max(roi.height, A(1));
    }
    return roi;
}

// Adaptive sampling's samples along an axis: ceil(bin size), 0 for a size <= 0, at most
// kMaxSamplesPerAxis. A valid roi's bin sizes are at most 2**25, so the conversion is exact.
template <typename A>
__device__ __forceinline__ long long adaptive_samples(const A bin_size) {
    return min(max(static_cast<long long>(ceil(bin_size)), 0LL), kMaxSamplesPerAxis);
}

// gh x gw samples at the centres of a regular grid over bin (ph, pw): gh = sampling_ratio if
// positive, else adaptive_samples(bin height) (same for gw).
template <typename A>
__device__ __forceinline__ BinSamples<A> aligned_bin_samples(const ScaledRoI<A>& roi,
                                                             const RoIItem<A>& r,
                                                             const RoIGeometry& geom,
                                                             const long long sampling_ratio) {
    const A bin_h = roi.height / A(geom.pooled_h);
    const A bin_w = roi.width / A(geom.pooled_w);
    BinSamples<A> s;
    s.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_samples(bin_h);
    s.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_samples(bin_w);
    s.start_y = roi.start_y + A(r.ph) * bin_h;
    s.start_x = roi.start_x + A(r.pw) * bin_w;
    // Without samples the step is never used; the divisor only has to be nonzero.
    s.step_y = bin_h / A(max(s.grid_h, 1LL));
    s.step_x = bin_w / A(max(s.grid_w, 1LL));
    s.phase = A(0.5);
    return s;
}

template <typename A>
struct RoIAlignOptions {
    A spatial_scale;
    long long sampling_ratio;
    bool aligned, max_mode, position_sensitive;
};

#define PYDEFORM_ROI_ALIGN_PARAMS                                                               \
    const pydeform::acc_t<T> spatial_scale, const long long sampling_ratio, const int aligned,  \
        const int max_mode, const int position_sensitive
#define PYDEFORM_ROI_ALIGN_OPTIONS                                                              \
    pydeform::RoIAlignOptions<pydeform::acc_t<T>> {                                             \
        spatial_scale, sampling_ratio, aligned != 0, max_mode != 0, position_sensitive != 0     \
    }

template <typename A>
__device__ __forceinline__ BinSamples<A> roi_align_samples(const RoIItem<A>& r,
                                                           const RoIGeometry& geom,
                                                           const RoIAlignOptions<A>& options) {
    return aligned_bin_samples(scaled_roi(r, options.spatial_scale, options.aligned), r, geom,
                               options.sampling_ratio);
}

// Rows [h_start, h_end) x columns [w_start, w_end) of a roi_pool bin, clipped to the plane.
struct PoolBin {
    long long h_start, h_end, w_start, w_end;
};

__device__ __forceinline__ long long clip_to(const long long value, const long long size) {
    return min(max(value, 0LL), size);
}

// Box corners scaled and rounded half away from zero (CUDA round, as torchvision).
template <typename A>
__device__ __forceinline__ long long rounded(const A value) {
    return static_cast<long long>(round(value));
}

// The bins of the rounded box: roi_pool's box spans x2 - x1 + 1 pixels, ps_roi_pool's x2 - x1
// (torchvision's two conventions), at least 1. Bin edges floor(ph * size / PH) and
// ceil((ph + 1) * size / PH) in exact integer arithmetic; clipping keeps every bin inside the
// plane whatever the box.
template <typename A>
__device__ __forceinline__ PoolBin roi_pool_bin(const RoIItem<A>& r, const RoIGeometry& geom,
                                                const A spatial_scale,
                                                const bool position_sensitive) {
    const long long end_pixel = position_sensitive ? 0 : 1;
    const long long start_x = rounded(r.x1 * spatial_scale);
    const long long start_y = rounded(r.y1 * spatial_scale);
    const long long roi_w = max(rounded(r.x2 * spatial_scale) - start_x + end_pixel, 1LL);
    const long long roi_h = max(rounded(r.y2 * spatial_scale) - start_y + end_pixel, 1LL);
    const long long ph = geom.pooled_h, pw = geom.pooled_w;
    PoolBin bin;
    bin.h_start = clip_to(r.ph * roi_h / ph + start_y, geom.height);
    bin.h_end = clip_to(((r.ph + 1) * roi_h + ph - 1) / ph + start_y, geom.height);
    bin.w_start = clip_to(r.pw * roi_w / pw + start_x, geom.width);
    bin.w_end = clip_to(((r.pw + 1) * roi_w + pw - 1) / pw + start_x, geom.width);
    return bin;
}

// body(h * width + w) for the pixels of a bin in row-major order.
template <typename Body>
__device__ __forceinline__ void for_each_pixel(const PoolBin& bin, const long long width,
                                               const Body& body) {
    for (long long h = bin.h_start; h < bin.h_end; ++h) {
        for (long long w = bin.w_start; w < bin.w_end; ++w) {
            body(h * width + w);
        }
    }
}

__device__ __forceinline__ long long pixel_count(const PoolBin& bin) {
    return max(bin.h_end - bin.h_start, 0LL) * max(bin.w_end - bin.w_start, 0LL);
}

template <typename A>
struct MaxPixel {
    A value;
    long long index;  // h * width + w; -1 (value 0) for an empty bin
};

// The first maximum of a bin in row-major order (NaN over everything: takes_over_max).
template <typename A, typename T>
__device__ __forceinline__ MaxPixel<A> max_pixel(const PoolBin& bin, const T* plane,
                                                 const long long width) {
    MaxPixel<A> best{A(0), -1};
    for_each_pixel(bin, width, [&](const long long index) {
        const A value = load_acc(plane + index);
        if (best.index < 0 || takes_over_max(value, best.value)) {
            best = MaxPixel<A>{value, index};
        }
    });
    return best;
}

#define PYDEFORM_ROI_POOL_PARAMS const pydeform::acc_t<T> spatial_scale, const int position_sensitive

template <typename A>
struct DeformRoIPoolOptions {
    A spatial_scale;
    long long sampling_ratio;
    A gamma;
    bool has_offset, has_mask;
};

#define PYDEFORM_DEFORM_ROI_POOL_PARAMS                                                         \
    const pydeform::acc_t<T> spatial_scale, const long long sampling_ratio,                     \
        const pydeform::acc_t<T> gamma, const int has_offset, const int has_mask
#define PYDEFORM_DEFORM_ROI_POOL_OPTIONS                                                        \
    pydeform::DeformRoIPoolOptions<pydeform::acc_t<T>> {                                        \
        spatial_scale, sampling_ratio, gamma, has_offset != 0, has_mask != 0                    \
    }

// A deform_roi_pool bin: roi_align's aligned samples, the bin moved by gamma * roi size * offset.
template <typename A>
struct DeformBin {
    BinSamples<A> samples;
    A roi_h, roi_w;
    A modulation;            // mask element, 1 without a mask
    long long offset_index;  // offset element of the x shift; the y shift is PH*PW further
    long long mask_index;
};

template <typename A, typename T>
__device__ __forceinline__ DeformBin<A> deform_roi_pool_bin(const RoIItem<A>& r,
                                                            const RoIGeometry& geom,
                                                            const T* __restrict__ offset,
                                                            const T* __restrict__ mask,
                                                            const DeformRoIPoolOptions<A>& options) {
    const long long bins = geom.pooled_h * geom.pooled_w;
    const long long cell = r.ph * geom.pooled_w + r.pw;
    DeformBin<A> b;
    b.offset_index = 2 * r.roi * bins + cell;
    b.mask_index = r.roi * bins + cell;
    ScaledRoI<A> roi = scaled_roi(r, options.spatial_scale, true);
    if (options.has_offset) {
        roi.start_x += options.gamma * roi.width * load_acc(offset + b.offset_index);
        roi.start_y += options.gamma * roi.height * load_acc(offset + b.offset_index + bins);
    }
    b.samples = aligned_bin_samples(roi, r, geom, options.sampling_ratio);
    b.roi_h = roi.height;
    b.roi_w = roi.width;
    b.modulation = options.has_mask ? A(load_acc(mask + b.mask_index)) : A(1);
    return b;
}

template <typename A>
struct DeformPSRoIPoolOptions {
    long long group_size, part_size, sample_per_part, num_classes;
    A spatial_scale, trans_std;
    bool has_trans;
};

#define PYDEFORM_DEFORM_PSROI_POOL_PARAMS                                                       \
    const long long group_size, const long long part_size, const long long sample_per_part,     \
        const long long num_classes, const pydeform::acc_t<T> spatial_scale,                    \
        const pydeform::acc_t<T> trans_std, const int has_trans
#define PYDEFORM_DEFORM_PSROI_POOL_OPTIONS                                                      \
    pydeform::DeformPSRoIPoolOptions<pydeform::acc_t<T>> {                                      \
        group_size, part_size, sample_per_part, num_classes, spatial_scale, trans_std,          \
            has_trans != 0                                                                      \
    }

// A deform_psroi_pool bin: sample_per_part^2 samples from the bin's corner (no half step),
// moved by trans * trans_std * roi size, reading the bin's group cell of the output channel.
template <typename A>
struct PSRoIBin {
    BinSamples<A> samples;
    A roi_h, roi_w;
    long long input_channel;
    long long trans_index;  // trans element of the x shift; the y shift is part^2 further
};

template <typename A, typename T>
__device__ __forceinline__ PSRoIBin<A> deform_psroi_pool_bin(
    const RoIItem<A>& r, const RoIGeometry& geom, const T* __restrict__ trans,
    const DeformPSRoIPoolOptions<A>& options) {
    const A scale = options.spatial_scale;
    const A start_x = round(r.x1) * scale - A(0.5);
    const A start_y = round(r.y1) * scale - A(0.5);
    PSRoIBin<A> b;
    b.roi_w = max((round(r.x2) + A(1)) * scale - A(0.5) - start_x, A(0.1));
    b.roi_h = max((round(r.y2) + A(1)) * scale - A(0.5) - start_y, A(0.1));
    const A bin_w = b.roi_w / A(geom.pooled_w);
    const A bin_h = b.roi_h / A(geom.pooled_h);

    const long long part_cells = options.part_size * options.part_size;
    const long long part_h = r.ph * options.part_size / geom.pooled_h;
    const long long part_w = r.pw * options.part_size / geom.pooled_w;
    const long long class_id = r.channel / (geom.channels_out / options.num_classes);
    b.trans_index = (r.roi * 2 * options.num_classes + 2 * class_id) * part_cells +
                    part_h * options.part_size + part_w;
    A shift_x = A(0), shift_y = A(0);
    if (options.has_trans) {
        shift_x = load_acc(trans + b.trans_index) * options.trans_std * b.roi_w;
        shift_y = load_acc(trans + b.trans_index + part_cells) * options.trans_std * b.roi_h;
    }
    b.samples.start_x = (A(r.pw) * bin_w + start_x) + shift_x;
    b.samples.start_y = (A(r.ph) * bin_h + start_y) + shift_y;
    b.samples.step_x = bin_w / A(options.sample_per_part);
    b.samples.step_y = bin_h / A(options.sample_per_part);
    b.samples.phase = A(0);
    b.samples.grid_h = b.samples.grid_w = options.sample_per_part;

    // ph < pooled_h, so the group cell is below group_size.
    const long long group_h = r.ph * options.group_size / geom.pooled_h;
    const long long group_w = r.pw * options.group_size / geom.pooled_w;
    b.input_channel = (r.channel * options.group_size + group_h) * options.group_size + group_w;
    return b;
}

// Samples outside [-0.5, H - 0.5] x [-0.5, W - 0.5] are skipped (and not counted); rule B then
// clamps the others into the plane as the original clamps before interpolating.
template <typename A>
__device__ __forceinline__ bool psroi_sample_inside(const RoIGeometry& geom, const A y, const A x) {
    return y >= A(-0.5) && y <= A(geom.height) - A(0.5) && x >= A(-0.5) &&
           x <= A(geom.width) - A(0.5);
}

}  // namespace pydeform

// output = the average (max_mode: the maximum) of the bin's samples.
template <typename T>
__global__ void roi_align_forward(const long long n_items, const T* __restrict__ input,
                                  const pydeform::acc_t<T>* __restrict__ rois,
                                  T* __restrict__ output, PYDEFORM_ROI_GEOMETRY_PARAMS,
                                  PYDEFORM_ROI_ALIGN_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const RoIAlignOptions<A> options = PYDEFORM_ROI_ALIGN_OPTIONS;
    pool_each_output(n_items, geom, rois, spatial_scale, output, [&](const RoIItem<A>& r) {
        const T* plane =
            input + plane_offset(geom, r.image, pooled_channel(geom, r, options.position_sensitive));
        const BinSamples<A> samples = roi_align_samples(r, geom, options);
        return options.max_mode ? max_sample(samples, plane, geom).value
                                : sample_sum(samples, plane, geom) / sample_count(samples);
    });
}

// grad_input += grad / count at every sample's corners (max_mode: grad at the arg-max sample's).
template <typename T>
__global__ void roi_align_backward(const long long n_items, const T* __restrict__ grad_output,
                                   const T* __restrict__ input,
                                   const pydeform::acc_t<T>* __restrict__ rois,
                                   pydeform::acc_t<T>* __restrict__ grad_input,
                                   PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_ALIGN_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const RoIAlignOptions<A> options = PYDEFORM_ROI_ALIGN_OPTIONS;
    scatter_each_grad(n_items, geom, rois, spatial_scale, grad_output, [&](const RoIItem<A>& r, const A grad) {
        const long long plane =
            plane_offset(geom, r.image, pooled_channel(geom, r, options.position_sensitive));
        const BinSamples<A> samples = roi_align_samples(r, geom, options);
        if (options.max_mode) {
            const MaxSample<A> best = max_sample(samples, input + plane, geom);
            if (best.found) {
                scatter_corners(roi_corners(geom, best.y, best.x), grad_input + plane, grad);
            }
            return;
        }
        const A share = grad / sample_count(samples);
        for_each_sample(samples, [&](const A y, const A x) {
            scatter_corners(roi_corners(geom, y, x), grad_input + plane, share);
        });
    });
}

// output = the bin's first maximum (position_sensitive: its average), 0 for an empty bin.
template <typename T>
__global__ void roi_pool_forward(const long long n_items, const T* __restrict__ input,
                                 const pydeform::acc_t<T>* __restrict__ rois,
                                 T* __restrict__ output, PYDEFORM_ROI_GEOMETRY_PARAMS,
                                 PYDEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    pool_each_output(n_items, geom, rois, spatial_scale, output, [&](const RoIItem<A>& r) {
        const PoolBin bin = roi_pool_bin(r, geom, spatial_scale, position_sensitive != 0);
        const T* plane =
            input + plane_offset(geom, r.image, pooled_channel(geom, r, position_sensitive != 0));
        if (!position_sensitive) {
            return max_pixel<A>(bin, plane, geom.width).value;
        }
        A sum = A(0);
        for_each_pixel(bin, geom.width, [&](const long long index) { sum += load_acc(plane + index); });
        const long long count = pixel_count(bin);
        return count > 0 ? sum / A(count) : A(0);
    });
}

// grad_input += grad at the bin's arg-max (position_sensitive: grad / area on every pixel).
template <typename T>
__global__ void roi_pool_backward(const long long n_items, const T* __restrict__ grad_output,
                                  const T* __restrict__ input,
                                  const pydeform::acc_t<T>* __restrict__ rois,
                                  pydeform::acc_t<T>* __restrict__ grad_input,
                                  PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    scatter_each_grad(n_items, geom, rois, spatial_scale, grad_output, [&](const RoIItem<A>& r, const A grad) {
        const PoolBin bin = roi_pool_bin(r, geom, spatial_scale, position_sensitive != 0);
        const long long plane =
            plane_offset(geom, r.image, pooled_channel(geom, r, position_sensitive != 0));
        if (!position_sensitive) {
            const MaxPixel<A> best = max_pixel<A>(bin, input + plane, geom.width);
            if (best.index >= 0) {
                atomic_accumulate(grad_input + plane + best.index, grad);
            }
            return;
        }
        const long long count = pixel_count(bin);
        if (count == 0) {
            return;
        }
        const A share = grad / A(count);
        for_each_pixel(bin, geom.width, [&](const long long index) {
            atomic_accumulate(grad_input + plane + index, share);
        });
    });
}

// output = mask * the average of the moved bin's samples. offset / mask are null exactly when
// has_offset / has_mask is 0.
template <typename T>
__global__ void deform_roi_pool_forward(const long long n_items, const T* __restrict__ input,
                                        const pydeform::acc_t<T>* __restrict__ rois,
                                        const T* __restrict__ offset, const T* __restrict__ mask,
                                        T* __restrict__ output, PYDEFORM_ROI_GEOMETRY_PARAMS,
                                        PYDEFORM_DEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformRoIPoolOptions<A> options = PYDEFORM_DEFORM_ROI_POOL_OPTIONS;
    pool_each_output(n_items, geom, rois, spatial_scale, output, [&](const RoIItem<A>& r) {
        const DeformBin<A> b = deform_roi_pool_bin(r, geom, offset, mask, options);
        const T* plane = input + plane_offset(geom, r.image, r.channel);
        return b.modulation * sample_sum(b.samples, plane, geom) / sample_count(b.samples);
    });
}

// grad_input += mask * grad / count at every sample's corners; grad_offset (x, y) +=
// mask * grad / count * gamma * roi size * the sum of the samples' position derivatives;
// grad_mask += grad * the average. grad_offset / grad_mask are null exactly when offset / mask are.
template <typename T>
__global__ void deform_roi_pool_backward(
    const long long n_items, const T* __restrict__ grad_output, const T* __restrict__ input,
    const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ offset,
    const T* __restrict__ mask, pydeform::acc_t<T>* __restrict__ grad_input,
    pydeform::acc_t<T>* __restrict__ grad_offset, pydeform::acc_t<T>* __restrict__ grad_mask,
    PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformRoIPoolOptions<A> options = PYDEFORM_DEFORM_ROI_POOL_OPTIONS;
    scatter_each_grad(n_items, geom, rois, spatial_scale, grad_output, [&](const RoIItem<A>& r, const A grad) {
        const DeformBin<A> b = deform_roi_pool_bin(r, geom, offset, mask, options);
        const long long plane = plane_offset(geom, r.image, r.channel);
        const A count = sample_count(b.samples);
        const A share = grad * b.modulation / count;
        const bool wants_samples = options.has_offset || options.has_mask;
        A sum = A(0), sum_dy = A(0), sum_dx = A(0);
        for_each_sample(b.samples, [&](const A y, const A x) {
            const BilinearCorners<A> corners = roi_corners(geom, y, x);
            scatter_corners(corners, grad_input + plane, share);
            if (wants_samples) {
                A values[4];
                load_corners(corners, input + plane, values);
                sum += corner_dot(corners.weight, values);
                sum_dy += corner_dot(corners.weight_dh, values);
                sum_dx += corner_dot(corners.weight_dw, values);
            }
        });
        if (options.has_offset) {
            const long long bins = geom.pooled_h * geom.pooled_w;
            atomic_accumulate(grad_offset + b.offset_index, share * options.gamma * b.roi_w * sum_dx);
            atomic_accumulate(grad_offset + b.offset_index + bins,
                              share * options.gamma * b.roi_h * sum_dy);
        }
        if (options.has_mask) {
            atomic_accumulate(grad_mask + b.mask_index, grad * sum / count);
        }
    });
}

// output = the average of the bin's samples inside the image, 0 if none is. trans is null
// exactly when has_trans is 0.
template <typename T>
__global__ void deform_psroi_pool_forward(const long long n_items, const T* __restrict__ input,
                                          const pydeform::acc_t<T>* __restrict__ rois,
                                          const T* __restrict__ trans, T* __restrict__ output,
                                          PYDEFORM_ROI_GEOMETRY_PARAMS,
                                          PYDEFORM_DEFORM_PSROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformPSRoIPoolOptions<A> options = PYDEFORM_DEFORM_PSROI_POOL_OPTIONS;
    pool_each_output(n_items, geom, rois, spatial_scale, output, [&](const RoIItem<A>& r) {
        const PSRoIBin<A> b = deform_psroi_pool_bin(r, geom, trans, options);
        const T* plane = input + plane_offset(geom, r.image, b.input_channel);
        A sum = A(0);
        long long count = 0;
        for_each_sample(b.samples, [&](const A y, const A x) {
            if (psroi_sample_inside(geom, y, x)) {
                sum += sample_corners(roi_corners(geom, y, x), plane);
                ++count;
            }
        });
        return count > 0 ? sum / A(count) : A(0);
    });
}

// grad_input += grad / count at the corners of every sample inside the image; grad_trans (x, y)
// += grad / count * trans_std * roi size * the sum of their position derivatives. grad_trans is
// null exactly when trans is.
template <typename T>
__global__ void deform_psroi_pool_backward(
    const long long n_items, const T* __restrict__ grad_output, const T* __restrict__ input,
    const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ trans,
    pydeform::acc_t<T>* __restrict__ grad_input, pydeform::acc_t<T>* __restrict__ grad_trans,
    PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_PSROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformPSRoIPoolOptions<A> options = PYDEFORM_DEFORM_PSROI_POOL_OPTIONS;
    scatter_each_grad(n_items, geom, rois, spatial_scale, grad_output, [&](const RoIItem<A>& r, const A grad) {
        const PSRoIBin<A> b = deform_psroi_pool_bin(r, geom, trans, options);
        long long count = 0;
        for_each_sample(b.samples, [&](const A y, const A x) {
            count += psroi_sample_inside(geom, y, x) ? 1 : 0;
        });
        if (count == 0) {
            return;
        }
        const long long plane = plane_offset(geom, r.image, b.input_channel);
        const A share = grad / A(count);
        A sum_dy = A(0), sum_dx = A(0);
        for_each_sample(b.samples, [&](const A y, const A x) {
            if (!psroi_sample_inside(geom, y, x)) {
                return;
            }
            const BilinearCorners<A> corners = roi_corners(geom, y, x);
            scatter_corners(corners, grad_input + plane, share);
            if (options.has_trans) {
                A values[4];
                load_corners(corners, input + plane, values);
                sum_dy += corner_dot(corners.weight_dh, values);
                sum_dx += corner_dot(corners.weight_dw, values);
            }
        });
        if (options.has_trans) {
            const long long part_cells = options.part_size * options.part_size;
            atomic_accumulate(grad_trans + b.trans_index, share * options.trans_std * b.roi_w * sum_dx);
            atomic_accumulate(grad_trans + b.trans_index + part_cells,
                              share * options.trans_std * b.roi_h * sum_dy);
        }
    });
}

// ------------------------------------------------------------------------------------------------
// The deterministic backward (contributions.cuh). Its work items are *position items*
// (k, q, ph, pw) of [K, Q, PH, PW]: the bins whose sample positions the output channels
// q*step .. (q+1)*step - 1 share (Q = 1 where every channel samples at the same positions; one
// per channel for the max modes, whose arg-max is the channel's own; one per class for
// deform_psroi_pool, whose trans is per class). A contribution goes to bucket
// (image*classes + class)*H*W + pixel; each class is shared by the input channels that read
// the same positions. The input gradient is then gathered, one work item per input element.

namespace pydeform {

struct RoIContributionLayout {
    long long position_channels;  // Q
    long long channel_step;       // output channel of position channel q: q * channel_step
    long long classes;            // buckets per image pixel
};

// The RoIItem of a position item, its channel that of position channel q.
template <typename A>
__device__ __forceinline__ RoIItem<A> position_roi_item(const long long item, const RoIGeometry& geom,
                                                        const RoIContributionLayout& layout,
                                                        const A* __restrict__ rois, const A spatial_scale) {
    const long long bins = geom.pooled_h * geom.pooled_w;
    const long long q = (item / bins) % layout.position_channels;
    const long long roi = item / (bins * layout.position_channels);
    return roi_item((roi * geom.channels_out + q * layout.channel_step) * bins + item % bins, geom, rois,
                    spatial_scale);
}

// Where one position item's contributions go: sink(class, pixel, weight) counts the
// contribution into its bucket (cursors == bucket counts) or, with fill, stores it there,
// numbered in call order (its `local` key).
template <typename A>
struct ContributionSink {
    bucket_t* cursors;
    ContributionLists<A> lists;
    bool fill;
    long long classes, plane_size;
    long long item, image, local;

    __device__ __forceinline__ void operator()(const long long key_class, const long long pixel, const A weight) {
        const long long bucket = (image * classes + key_class) * plane_size + pixel;
        if (fill) {
            store_contribution(lists, claim_slot(cursors, bucket), item, local, weight);
        } else {
            count_contribution(cursors, bucket);
        }
        ++local;
    }
};

// Counts or stores (fill) every contribution of every valid position item;
// contributions(r, sink) calls sink(class, pixel, weight) for each of r's contributions in a
// fixed order.
template <typename A, typename Contributions>
__device__ __forceinline__ void roi_contribution_lists(
    const long long n_items, const RoIGeometry& geom, const RoIContributionLayout& layout,
    const A* __restrict__ rois, const A spatial_scale, bucket_t* __restrict__ cursors, const ContributionLists<A>& lists,
    const bool fill, const Contributions& contributions) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<A> r = position_roi_item(item, geom, layout, rois, spatial_scale);
        if (r.valid) {
            ContributionSink<A> sink{cursors, lists, fill, layout.classes, geom.height * geom.width, item, r.image, 0};
            contributions(r, sink);
        }
    }
}

// emit(key_class, corner index, scale * corner weight) for each contributing corner.
template <typename A>
__device__ __forceinline__ void emit_corners(const BilinearCorners<A>& corners, const long long key_class,
                                             const A scale, ContributionSink<A>& emit) {
    for (int k = 0; k < 4; ++k) {
        if (corners.valid[k]) {
            emit(key_class, corners.index[k], scale * corners.weight[k]);
        }
    }
}

// grad_input[image, c, pixel] = sum over bucket (image*classes + key_class(c))*H*W + pixel of
// weight * grad_output[k, source_channel(c, q), ph, pw] for the position items (k, q, ph, pw)
// of its list, in list order; one work item per input element, all written.
template <typename A, typename T, typename KeyClass, typename SourceChannel>
__device__ __forceinline__ void gather_roi_input_grad(
    const long long n_items, const RoIGeometry& geom, const RoIContributionLayout& layout,
    const bucket_t* __restrict__ bucket_ends, const long long* __restrict__ contribution_item,
    const A* __restrict__ contribution_weight, const T* __restrict__ grad_output, A* __restrict__ grad_input,
    const KeyClass& key_class, const SourceChannel& source_channel) {
    const long long plane_size = geom.height * geom.width;
    const long long bins = geom.pooled_h * geom.pooled_w;
    for (long long element = grid_stride_begin(); element < n_items; element += grid_stride_step()) {
        const long long plane = element / plane_size;
        const long long channel = plane % geom.channels;
        const long long image = plane / geom.channels;
        const long long bucket = (image * layout.classes + key_class(channel)) * plane_size + element % plane_size;
        A sum = A(0);
        for (long long slot = bucket_begin(bucket_ends, bucket); slot < static_cast<long long>(bucket_ends[bucket]);
             ++slot) {
            const long long item = contribution_item[slot];
            const long long q = (item / bins) % layout.position_channels;
            const long long roi = item / (bins * layout.position_channels);
            const long long source = (roi * geom.channels_out + source_channel(channel, q)) * bins + item % bins;
            sum += contribution_weight[slot] * load_acc(grad_output + source);
        }
        grad_input[element] = sum;
    }
}

// Position items of the ops whose bins every output channel (position-sensitive: every channel
// of a cell) samples alike, or one per output channel (per_channel: the max modes).
__device__ __forceinline__ RoIContributionLayout pooled_layout(const RoIGeometry& geom, const bool per_channel,
                                                               const bool position_sensitive) {
    if (per_channel) {
        return RoIContributionLayout{geom.channels_out, 1, geom.channels};
    }
    return RoIContributionLayout{1, 1, position_sensitive ? geom.pooled_h * geom.pooled_w : 1};
}

// The gather of the pooled layouts: a per-channel bucket is the input channel's own, a
// position-sensitive one its cell's; the source is the position item's channel, or the input
// channel's output channel.
template <typename A, typename T>
__device__ __forceinline__ void gather_pooled_input_grad(
    const long long n_items, const RoIGeometry& geom, const bool per_channel, const bool position_sensitive,
    const bucket_t* __restrict__ bucket_ends, const long long* __restrict__ contribution_item,
    const A* __restrict__ contribution_weight, const T* __restrict__ grad_output, A* __restrict__ grad_input) {
    const long long bins = geom.pooled_h * geom.pooled_w;
    gather_roi_input_grad(
        n_items, geom, pooled_layout(geom, per_channel, position_sensitive), bucket_ends, contribution_item,
        contribution_weight, grad_output, grad_input,
        [&](const long long channel) { return per_channel ? channel : position_sensitive ? channel % bins : 0; },
        [&](const long long channel, const long long q) {
            return per_channel ? q : position_sensitive ? channel / bins : channel;
        });
}

template <typename A>
struct SlopeSums {
    A value, dy, dx;  // the sum of the samples and of their derivatives by y and x
    long long count;  // samples taken
};

// Sums over a bin's samples that `inside(y, x)` accepts, of the values and slopes of one plane.
template <typename A, typename T, typename Inside>
__device__ __forceinline__ SlopeSums<A> slope_sums(const BinSamples<A>& samples, const T* plane,
                                                   const RoIGeometry& geom, const Inside& inside) {
    SlopeSums<A> sums{A(0), A(0), A(0), 0};
    for_each_sample(samples, [&](const A y, const A x) {
        if (!inside(y, x)) {
            return;
        }
        const BilinearCorners<A> corners = roi_corners(geom, y, x);
        A values[4];
        load_corners(corners, plane, values);
        sums.value += corner_dot(corners.weight, values);
        sums.dy += corner_dot(corners.weight_dh, values);
        sums.dx += corner_dot(corners.weight_dw, values);
        ++sums.count;
    });
    return sums;
}

}  // namespace pydeform

// The contribution lists of roi_align / ps_roi_align (fill == 0: count them into cursors).
template <typename T>
__global__ void roi_align_backward_lists(const long long n_items, const T* __restrict__ input,
                                         const pydeform::acc_t<T>* __restrict__ rois,
                                         PYDEFORM_CONTRIBUTION_LIST_PARAMS, const int fill,
                                         PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_ALIGN_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const RoIAlignOptions<A> options = PYDEFORM_ROI_ALIGN_OPTIONS;
    roi_contribution_lists(
        n_items, geom, pooled_layout(geom, options.max_mode, options.position_sensitive), rois, A(spatial_scale),
        cursors,
        PYDEFORM_CONTRIBUTION_LISTS, fill != 0,
        [&](const RoIItem<A>& r, ContributionSink<A>& emit) {
            const long long channel = pooled_channel(geom, r, options.position_sensitive);
            const BinSamples<A> samples = roi_align_samples(r, geom, options);
            if (options.max_mode) {
                const MaxSample<A> best =
                    max_sample(samples, input + plane_offset(geom, r.image, channel), geom);
                if (best.found) {
                    emit_corners(roi_corners(geom, best.y, best.x), channel, A(1), emit);
                }
                return;
            }
            const A share = A(1) / sample_count(samples);
            for_each_sample(samples, [&](const A y, const A x) {
                emit_corners(roi_corners(geom, y, x), channel, share, emit);
            });
        });
}

template <typename T>
__global__ void roi_align_backward_gather(const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
                                          const T* __restrict__ grad_output,
                                          pydeform::acc_t<T>* __restrict__ grad_input,
                                          PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_ALIGN_PARAMS) {
    using namespace pydeform;
    const RoIAlignOptions<acc_t<T>> options = PYDEFORM_ROI_ALIGN_OPTIONS;
    gather_pooled_input_grad(n_items, PYDEFORM_ROI_GEOMETRY, options.max_mode, options.position_sensitive,
                             bucket_ends, contribution_item, contribution_weight, grad_output, grad_input);
}

// The contribution lists of roi_pool (the arg-max pixel, per channel) / ps_roi_pool (every
// pixel of the bin, 1 / area).
template <typename T>
__global__ void roi_pool_backward_lists(const long long n_items, const T* __restrict__ input,
                                        const pydeform::acc_t<T>* __restrict__ rois,
                                        PYDEFORM_CONTRIBUTION_LIST_PARAMS, const int fill,
                                        PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const bool sensitive = position_sensitive != 0;
    roi_contribution_lists(
        n_items, geom, pooled_layout(geom, !sensitive, sensitive), rois, A(spatial_scale), cursors,
        PYDEFORM_CONTRIBUTION_LISTS, fill != 0,
        [&](const RoIItem<A>& r, ContributionSink<A>& emit) {
            const PoolBin bin = roi_pool_bin(r, geom, spatial_scale, sensitive);
            const long long channel = pooled_channel(geom, r, sensitive);
            if (!sensitive) {
                const MaxPixel<A> best =
                    max_pixel<A>(bin, input + plane_offset(geom, r.image, channel), geom.width);
                if (best.index >= 0) {
                    emit(channel, best.index, A(1));
                }
                return;
            }
            const long long count = pixel_count(bin);
            if (count == 0) {
                return;
            }
            const A share = A(1) / A(count);
            for_each_pixel(bin, geom.width, [&](const long long index) { emit(channel, index, share); });
        });
}

template <typename T>
__global__ void roi_pool_backward_gather(const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
                                         const T* __restrict__ grad_output,
                                         pydeform::acc_t<T>* __restrict__ grad_input,
                                         PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    (void)spatial_scale;  // the bins are in the lists already
    gather_pooled_input_grad(n_items, PYDEFORM_ROI_GEOMETRY, position_sensitive == 0, position_sensitive != 0,
                             bucket_ends, contribution_item, contribution_weight, grad_output, grad_input);
}

// The contribution lists of deform_roi_pool's input gradient: mask / count * corner weight at
// every sample's corners, shared by all channels.
template <typename T>
__global__ void deform_roi_pool_backward_lists(
    const long long n_items, const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ offset,
    const T* __restrict__ mask, PYDEFORM_CONTRIBUTION_LIST_PARAMS,
    const int fill, PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformRoIPoolOptions<A> options = PYDEFORM_DEFORM_ROI_POOL_OPTIONS;
    roi_contribution_lists(
        n_items, geom, pooled_layout(geom, false, false), rois, A(spatial_scale), cursors,
        PYDEFORM_CONTRIBUTION_LISTS, fill != 0,
        [&](const RoIItem<A>& r, ContributionSink<A>& emit) {
            const DeformBin<A> b = deform_roi_pool_bin(r, geom, offset, mask, options);
            const A share = b.modulation / sample_count(b.samples);
            for_each_sample(b.samples, [&](const A y, const A x) {
                emit_corners(roi_corners(geom, y, x), 0, share, emit);
            });
        });
}

template <typename T>
__global__ void deform_roi_pool_backward_gather(
    const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
    const T* __restrict__ grad_output, pydeform::acc_t<T>* __restrict__ grad_input, PYDEFORM_ROI_GEOMETRY_PARAMS) {
    using namespace pydeform;
    gather_pooled_input_grad(n_items, PYDEFORM_ROI_GEOMETRY, false, false, bucket_ends, contribution_item,
                             contribution_weight, grad_output, grad_input);
}

// Each output element's share of the offset (x, y) and mask gradients, written to partials
// [3, K, C, PH, PW] (0 for an invalid roi); the deterministic twin of the backward's atomics.
template <typename T>
__global__ void deform_roi_pool_backward_partials(
    const long long n_items, const T* __restrict__ grad_output, const T* __restrict__ input,
    const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ offset, const T* __restrict__ mask,
    pydeform::acc_t<T>* __restrict__ partials, PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformRoIPoolOptions<A> options = PYDEFORM_DEFORM_ROI_POOL_OPTIONS;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<A> r = roi_item(item, geom, rois, options.spatial_scale);
        A grad_x = A(0), grad_y = A(0), grad_mask = A(0);
        if (r.valid) {
            const DeformBin<A> b = deform_roi_pool_bin(r, geom, offset, mask, options);
            const SlopeSums<A> sums = slope_sums(b.samples, input + plane_offset(geom, r.image, r.channel), geom,
                                                 [](A, A) { return true; });
            const A grad = load_acc(grad_output + item);
            const A count = sample_count(b.samples);
            const A share = grad * b.modulation / count;
            grad_x = share * options.gamma * b.roi_w * sums.dx;
            grad_y = share * options.gamma * b.roi_h * sums.dy;
            grad_mask = grad * sums.value / count;
        }
        partials[item] = grad_x;
        partials[n_items + item] = grad_y;
        partials[2 * n_items + item] = grad_mask;
    }
}

// grad_offset / grad_mask element (k, x|y|mask, ph, pw) = the sum over channels, in channel
// order, of the partials; one work item per (k, component, bin) of [K, 3, PH, PW], all written
// (grad_offset / grad_mask are null exactly when has_offset / has_mask is 0).
template <typename T>
__global__ void deform_roi_pool_backward_params_sum(
    const long long n_items, const pydeform::acc_t<T>* __restrict__ partials,
    pydeform::acc_t<T>* __restrict__ grad_offset, pydeform::acc_t<T>* __restrict__ grad_mask,
    PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_ROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    (void)batch, (void)height, (void)width, (void)channels_out, (void)spatial_scale, (void)sampling_ratio,
        (void)gamma;
    const long long bins = pooled_h * pooled_w;
    const long long outputs = n_items / 3 * channels;  // K*C*PH*PW elements per component
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const long long bin = item % bins;
        const long long component = (item / bins) % 3;
        const long long roi = item / (3 * bins);
        if ((component < 2 && !has_offset) || (component == 2 && !has_mask)) {
            continue;
        }
        const A* first = partials + component * outputs + roi * channels * bins + bin;
        A sum = A(0);
        for (long long c = 0; c < channels; ++c) {
            sum += first[c * bins];
        }
        if (component < 2) {
            grad_offset[(2 * roi + component) * bins + bin] = sum;
        } else {
            grad_mask[roi * bins + bin] = sum;
        }
    }
}

// deform_psroi_pool's position items are (k, class, ph, pw): a class's channels share trans.
__device__ __forceinline__ pydeform::RoIContributionLayout psroi_layout(const pydeform::RoIGeometry& geom,
                                                                        const long long num_classes,
                                                                        const long long group_size) {
    return pydeform::RoIContributionLayout{num_classes, geom.channels_out / num_classes,
                                           num_classes * group_size * group_size};
}

// The contribution lists of deform_psroi_pool's input gradient: corner weight / count at the
// corners of every sample inside the image; class (class id, group cell).
template <typename T>
__global__ void deform_psroi_pool_backward_lists(
    const long long n_items, const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ trans,
    PYDEFORM_CONTRIBUTION_LIST_PARAMS,
    const int fill, PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_PSROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformPSRoIPoolOptions<A> options = PYDEFORM_DEFORM_PSROI_POOL_OPTIONS;
    const RoIContributionLayout layout = psroi_layout(geom, num_classes, group_size);
    const long long cells = group_size * group_size;
    roi_contribution_lists(
        n_items, geom, layout, rois, A(spatial_scale), cursors,
        PYDEFORM_CONTRIBUTION_LISTS, fill != 0,
        [&](const RoIItem<A>& r, ContributionSink<A>& emit) {
            const PSRoIBin<A> b = deform_psroi_pool_bin(r, geom, trans, options);
            long long count = 0;
            for_each_sample(b.samples, [&](const A y, const A x) {
                count += psroi_sample_inside(geom, y, x) ? 1 : 0;
            });
            if (count == 0) {
                return;
            }
            const long long key_class = r.channel / layout.channel_step * cells + b.input_channel % cells;
            const A share = A(1) / A(count);
            for_each_sample(b.samples, [&](const A y, const A x) {
                if (psroi_sample_inside(geom, y, x)) {
                    emit_corners(roi_corners(geom, y, x), key_class, share, emit);
                }
            });
        });
}

template <typename T>
__global__ void deform_psroi_pool_backward_gather(
    const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
    const T* __restrict__ grad_output, pydeform::acc_t<T>* __restrict__ grad_input, PYDEFORM_ROI_GEOMETRY_PARAMS,
    const long long group_size, const long long num_classes) {
    using namespace pydeform;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const RoIContributionLayout layout = psroi_layout(geom, num_classes, group_size);
    const long long cells = group_size * group_size;
    // Input channel (c*group + gh)*group + gw reads output channel c at group cell (gh, gw).
    gather_roi_input_grad(
        n_items, geom, layout, bucket_ends, contribution_item, contribution_weight, grad_output, grad_input,
        [&](const long long channel) { return channel / cells / layout.channel_step * cells + channel % cells; },
        [&](const long long channel, long long) { return channel / cells; });
}

// Each output element's share of the trans (x, y) gradient, written to partials [2, K, C_out,
// PH, PW] (0 for an invalid roi or a bin without samples inside).
template <typename T>
__global__ void deform_psroi_pool_backward_partials(
    const long long n_items, const T* __restrict__ grad_output, const T* __restrict__ input,
    const pydeform::acc_t<T>* __restrict__ rois, const T* __restrict__ trans,
    pydeform::acc_t<T>* __restrict__ partials, PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_PSROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const RoIGeometry geom = PYDEFORM_ROI_GEOMETRY;
    const DeformPSRoIPoolOptions<A> options = PYDEFORM_DEFORM_PSROI_POOL_OPTIONS;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<A> r = roi_item(item, geom, rois, options.spatial_scale);
        A grad_x = A(0), grad_y = A(0);
        if (r.valid) {
            const PSRoIBin<A> b = deform_psroi_pool_bin(r, geom, trans, options);
            const SlopeSums<A> sums =
                slope_sums(b.samples, input + plane_offset(geom, r.image, b.input_channel), geom,
                           [&](const A y, const A x) { return psroi_sample_inside(geom, y, x); });
            if (sums.count > 0) {
                const A share = load_acc(grad_output + item) / A(sums.count);
                grad_x = share * options.trans_std * b.roi_w * sums.dx;
                grad_y = share * options.trans_std * b.roi_h * sums.dy;
            }
        }
        partials[item] = grad_x;
        partials[n_items + item] = grad_y;
    }
}

// grad_trans element (k, 2*class + x|y, part_h, part_w) = the sum, in (channel, ph, pw) order,
// of the partials of the class's channels and the bins of that part cell; one work item per
// element of grad_trans [K, 2*classes, P, P], all written.
template <typename T>
__global__ void deform_psroi_pool_backward_params_sum(
    const long long n_items, const pydeform::acc_t<T>* __restrict__ partials,
    pydeform::acc_t<T>* __restrict__ grad_trans, PYDEFORM_ROI_GEOMETRY_PARAMS, PYDEFORM_DEFORM_PSROI_POOL_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    (void)batch, (void)channels, (void)height, (void)width, (void)group_size, (void)sample_per_part,
        (void)spatial_scale, (void)trans_std, (void)has_trans;
    const long long part_cells = part_size * part_size;
    const long long bins = pooled_h * pooled_w;
    const long long class_channels = channels_out / num_classes;
    const long long outputs = n_items / (2 * num_classes * part_cells) * channels_out * bins;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const long long cell = item % part_cells;
        const long long part_h = cell / part_size, part_w = cell % part_size;
        const long long component = (item / part_cells) % 2;
        const long long class_id = (item / (2 * part_cells)) % num_classes;
        const long long roi = item / (2 * num_classes * part_cells);
        const A* first = partials + component * outputs + (roi * channels_out + class_id * class_channels) * bins;
        A sum = A(0);
        for (long long c = 0; c < class_channels; ++c) {
            for (long long ph = 0; ph < pooled_h; ++ph) {
                if (ph * part_size / pooled_h != part_h) {
                    continue;
                }
                for (long long pw = 0; pw < pooled_w; ++pw) {
                    if (pw * part_size / pooled_w == part_w) {
                        sum += first[(c * pooled_h + ph) * pooled_w + pw];
                    }
                }
            }
        }
        grad_trans[item] = sum;
    }
}
