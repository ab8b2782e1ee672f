// RoI pooling (SPEC section 3), a forward and a backward kernel per family:
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

namespace pydeform {

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
    bool valid;       // integer batch index in [0, batch), finite box; else nothing is read
    long long image;  // the batch index
    A x1, y1, x2, y2;
};

template <typename A>
__device__ __forceinline__ RoIItem<A> roi_item(const long long item, const RoIGeometry& geom,
                                               const A* __restrict__ rois) {
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
    // The Python side rejects such rows unless the call skips the host check (on the GPU under
    // pydeform.torch / pydeform.jax, to avoid a synchronisation): a batch index that is not an
    // integer in [0, batch) or a non-finite coordinate makes the row invalid, nothing of the
    // input is read for it and its outputs are 0. The index is compared before the conversion,
    // which could overflow; v - v is 0 exactly for finite v.
    r.valid = image >= A(0) && image < A(geom.batch) && image == floor(image) && r.x1 - r.x1 == A(0) &&
              r.y1 - r.y1 == A(0) && r.x2 - r.x2 == A(0) && r.y2 - r.y2 == A(0);
    r.image = r.valid ? static_cast<long long>(image) : 0;
    return r;
}

// output[item] = pool(item) for every work item, 0 where the roi is invalid.
template <typename T, typename Pool>
__device__ __forceinline__ void pool_each_output(const long long n_items, const RoIGeometry& geom,
                                                 const acc_t<T>* __restrict__ rois,
                                                 T* __restrict__ output, const Pool& pool) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<acc_t<T>> r = roi_item(item, geom, rois);
        output[item] = from_acc<T>(r.valid ? pool(r) : acc_t<T>(0));
    }
}

// scatter(item, grad_output[item]) for every work item of a valid roi.
template <typename T, typename Scatter>
__device__ __forceinline__ void scatter_each_grad(const long long n_items, const RoIGeometry& geom,
                                                  const acc_t<T>* __restrict__ rois,
                                                  const T* __restrict__ grad_output,
                                                  const Scatter& scatter) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const RoIItem<acc_t<T>> r = roi_item(item, geom, rois);
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

// gh x gw samples at the centres of a regular grid over bin (ph, pw): gh = sampling_ratio if
// positive, else ceil(bin height), none for a roi of size <= 0 (same for gw).
template <typename A>
__device__ __forceinline__ BinSamples<A> aligned_bin_samples(const ScaledRoI<A>& roi,
                                                             const RoIItem<A>& r,
                                                             const RoIGeometry& geom,
                                                             const long long sampling_ratio) {
    const A bin_h = roi.height / A(geom.pooled_h);
    const A bin_w = roi.width / A(geom.pooled_w);
    BinSamples<A> s;
    s.grid_h = sampling_ratio > 0 ? sampling_ratio : max(static_cast<long long>(ceil(bin_h)), 0LL);
    s.grid_w = sampling_ratio > 0 ? sampling_ratio : max(static_cast<long long>(ceil(bin_w)), 0LL);
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
    pool_each_output(n_items, geom, rois, output, [&](const RoIItem<A>& r) {
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
    scatter_each_grad(n_items, geom, rois, grad_output, [&](const RoIItem<A>& r, const A grad) {
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
    pool_each_output(n_items, geom, rois, output, [&](const RoIItem<A>& r) {
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
    scatter_each_grad(n_items, geom, rois, grad_output, [&](const RoIItem<A>& r, const A grad) {
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
    pool_each_output(n_items, geom, rois, output, [&](const RoIItem<A>& r) {
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
    scatter_each_grad(n_items, geom, rois, grad_output, [&](const RoIItem<A>& r, const A grad) {
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
    pool_each_output(n_items, geom, rois, output, [&](const RoIItem<A>& r) {
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
    scatter_each_grad(n_items, geom, rois, grad_output, [&](const RoIItem<A>& r, const A grad) {
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
