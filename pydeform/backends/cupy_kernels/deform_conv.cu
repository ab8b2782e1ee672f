// Deformable convolution v1 / v2 (docs/deform_conv.md): im2col for the forward pass, col2im_coord
// for the offset and mask gradients, col2im for the input gradient.
//
// One work item per (b, g, i, j, y, x) -- batch, offset group, kernel row, kernel column,
// output row, output column, x fastest. An item computes its sampling position and the bilinear
// corners once and then loops over the channels of offset group g, which all share that offset.
// `columns` / `grad_columns` are [B, C*kh*kw, Ho*Wo] in the accumulation type;
// `offset` is [B, 2*Goff*kh*kw, Ho, Wo] (dy then dx per kernel point), `mask` [B, Goff*kh*kw, Ho, Wo]
// or null when has_mask == 0 (DCNv1: m = 1).

#include "common.cuh"
#include "bilinear.cuh"
#include "contributions.cuh"

namespace pydeform {

struct DeformConv2dGeometry {
    long long channels, height, width;
    long long kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
    long long offset_groups, out_h, out_w;
};

// The geometry travels as flat scalars (what CuPy and ctypes can pass), in this order, in every
// kernel of this file; the Python side builds the same list in one function.
#define PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS                                                   \
    const long long channels, const long long height, const long long width,                    \
        const long long kernel_h, const long long kernel_w, const long long stride_h,           \
        const long long stride_w, const long long pad_h, const long long pad_w,                 \
        const long long dilation_h, const long long dilation_w, const long long offset_groups,  \
        const long long out_h, const long long out_w
#define PYDEFORM_DEFORM_CONV2D_GEOMETRY                                                          \
    pydeform::DeformConv2dGeometry {                                                            \
        channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,          \
            dilation_h, dilation_w, offset_groups, out_h, out_w                                 \
    }

// What one work item shares across the channels of its offset group.
template <typename A>
struct DeformConv2dSample {
    BilinearCorners<A> corners;  // rule A set-up of the sampling position
    A modulation;                // m, 1 without a mask
    long long offset_index;      // offset element of dy; dx is out_h*out_w further
    long long mask_index;        // mask element of m
    long long first_plane;       // b*C + g*C/Goff: the (batch, channel) plane of the group's first channel
    long long first_column;      // columns element of (b, that channel, i, j, y, x)
    long long channels_per_group;
    long long plane_size;        // height*width: distance between channel planes
    long long column_stride;     // kh*kw*out_h*out_w: distance between channels in the columns
};

template <typename T>
__device__ __forceinline__ DeformConv2dSample<acc_t<T>> deform_conv2d_sample(
    const long long item, const DeformConv2dGeometry& geom, const T* __restrict__ offset,
    const T* __restrict__ mask, const int has_mask) {
    using A = acc_t<T>;
    const long long out_size = geom.out_h * geom.out_w;
    const long long kernel_size = geom.kernel_h * geom.kernel_w;
    const long long pixel = item % out_size;
    const long long kernel_point = (item / out_size) % kernel_size;
    const long long group_plane = item / (out_size * kernel_size);  // b*Goff + g
    const long long group = group_plane % geom.offset_groups;
    const long long batch = group_plane / geom.offset_groups;
    const long long y = pixel / geom.out_w, x = pixel % geom.out_w;
    const long long i = kernel_point / geom.kernel_w, j = kernel_point % geom.kernel_w;

    DeformConv2dSample<A> sample;
    sample.offset_index = (group_plane * 2 * kernel_size + 2 * kernel_point) * out_size + pixel;
    sample.mask_index = (group_plane * kernel_size + kernel_point) * out_size + pixel;
    const A dy = load_acc(offset + sample.offset_index);
    const A dx = load_acc(offset + sample.offset_index + out_size);
    sample.modulation = has_mask ? A(load_acc(mask + sample.mask_index)) : A(1);
    const A h = A(y * geom.stride_h - geom.pad_h + i * geom.dilation_h) + dy;
    const A w = A(x * geom.stride_w - geom.pad_w + j * geom.dilation_w) + dx;
    sample.corners = zero_padded_corners(h, w, geom.height, geom.width);

    sample.channels_per_group = geom.channels / geom.offset_groups;
    sample.first_plane = batch * geom.channels + group * sample.channels_per_group;
    sample.first_column = (sample.first_plane * kernel_size + kernel_point) * out_size + pixel;
    sample.plane_size = geom.height * geom.width;
    sample.column_stride = kernel_size * out_size;
    return sample;
}

// The input-gradient contributions of one work item: body(bucket, corner, weight) for each valid
// corner, bucket = (b*Goff + g)*H*W + pixel (shared by the channels of group g), weight =
// m * the corner's bilinear weight.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_col2im_contribution(
    const long long item, const DeformConv2dGeometry& geom, const T* __restrict__ offset,
    const T* __restrict__ mask, const int has_mask, const Body& body) {
    const DeformConv2dSample<acc_t<T>> sample = deform_conv2d_sample(item, geom, offset, mask, has_mask);
    const long long group_plane = item / (geom.kernel_h * geom.kernel_w * geom.out_h * geom.out_w);
    for (int k = 0; k < 4; ++k) {
        if (sample.corners.valid[k]) {
            body(group_plane * sample.plane_size + sample.corners.index[k], k,
                 sample.modulation * sample.corners.weight[k]);
        }
    }
}

// Runs body(sample) for every work item of the grid-stride loop.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_deform_conv2d_sample(
    const long long n_items, const DeformConv2dGeometry& geom, const T* __restrict__ offset,
    const T* __restrict__ mask, const int has_mask, const Body& body) {
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        body(deform_conv2d_sample(item, geom, offset, mask, has_mask));
    }
}

}  // namespace pydeform

// columns[b, c*kh*kw + i*kw + j, y*Wo + x] = m * B_A(input[b, c], h, w); every element written.
template <typename T>
__global__ void deform_conv2d_im2col(const long long n_items, const T* __restrict__ input,
                                     const T* __restrict__ offset, const T* __restrict__ mask,
                                     const int has_mask, pydeform::acc_t<T>* __restrict__ columns,
                                     PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    for_each_deform_conv2d_sample(
        n_items, PYDEFORM_DEFORM_CONV2D_GEOMETRY, offset, mask, has_mask,
        [&](const DeformConv2dSample<A>& sample) {
            for (long long c = 0; c < sample.channels_per_group; ++c) {
                A corner_values[4];
                load_corners(sample.corners, input + (sample.first_plane + c) * sample.plane_size,
                             corner_values);
                columns[sample.first_column + c * sample.column_stride] =
                    sample.modulation * corner_dot(sample.corners.weight, corner_values);
            }
        });
}

// grad_offset = m * sum_c gcol * dB_A/dh (dw), grad_mask = sum_c gcol * B_A, over the channels of
// the offset group; both written (not accumulated) for every element, 0 where the sample is
// outside (-1, H) x (-1, W). grad_mask is null exactly when has_mask == 0.
template <typename T>
__global__ void deform_conv2d_col2im_coord(
    const long long n_items, const T* __restrict__ input, const T* __restrict__ offset,
    const T* __restrict__ mask, const int has_mask,
    const pydeform::acc_t<T>* __restrict__ grad_columns, T* __restrict__ grad_offset,
    T* __restrict__ grad_mask, PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const long long out_size = out_h * out_w;
    for_each_deform_conv2d_sample(
        n_items, PYDEFORM_DEFORM_CONV2D_GEOMETRY, offset, mask, has_mask,
        [&](const DeformConv2dSample<A>& sample) {
            A grad_h = A(0), grad_w = A(0), grad_modulation = A(0);
            if (sample.corners.any_valid) {
                for (long long c = 0; c < sample.channels_per_group; ++c) {
                    const A grad_column =
                        load_acc(grad_columns + sample.first_column + c * sample.column_stride);
                    A corner_values[4];
                    load_corners(sample.corners,
                                 input + (sample.first_plane + c) * sample.plane_size, corner_values);
                    grad_h += grad_column * corner_dot(sample.corners.weight_dh, corner_values);
                    grad_w += grad_column * corner_dot(sample.corners.weight_dw, corner_values);
                    grad_modulation +=
                        grad_column * corner_dot(sample.corners.weight, corner_values);
                }
            }
            // Outside (-1, H) x (-1, W) the offset gradient is 0, not m * 0: NaN for a NaN mask.
            const A modulation = sample.corners.any_valid ? sample.modulation : A(0);
            grad_offset[sample.offset_index] = from_acc<T>(modulation * grad_h);
            grad_offset[sample.offset_index + out_size] = from_acc<T>(modulation * grad_w);
            if (has_mask) {
                grad_mask[sample.mask_index] = from_acc<T>(grad_modulation);
            }
        });
}

// grad_input (zero-filled by the caller) += m * corner weight * gcol at the four corners.
template <typename T>
__global__ void deform_conv2d_col2im(const long long n_items, const T* __restrict__ offset,
                                     const T* __restrict__ mask, const int has_mask,
                                     const pydeform::acc_t<T>* __restrict__ grad_columns,
                                     pydeform::acc_t<T>* __restrict__ grad_input,
                                     PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    for_each_deform_conv2d_sample(
        n_items, PYDEFORM_DEFORM_CONV2D_GEOMETRY, offset, mask, has_mask,
        [&](const DeformConv2dSample<A>& sample) {
            if (!sample.corners.any_valid) {
                return;
            }
            for (long long c = 0; c < sample.channels_per_group; ++c) {
                const A grad_column =
                    load_acc(grad_columns + sample.first_column + c * sample.column_stride);
                scatter_corners(sample.corners,
                                grad_input + (sample.first_plane + c) * sample.plane_size,
                                sample.modulation * grad_column);
            }
        });
}

// The deterministic input gradient (contributions.cuh): count and fill the contribution lists
// of the buckets (b*Goff + g)*H*W + pixel, sort them (contribution_lists_sort), then gather.
template <typename T>
__global__ void deform_conv2d_col2im_count(const long long n_items, const T* __restrict__ offset,
                                           const T* __restrict__ mask, const int has_mask,
                                           pydeform::bucket_t* __restrict__ bucket_counts,
                                           PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    const DeformConv2dGeometry geom = PYDEFORM_DEFORM_CONV2D_GEOMETRY;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        for_each_col2im_contribution(item, geom, offset, mask, has_mask,
                                     [&](const long long bucket, int, acc_t<T>) {
                                         count_contribution(bucket_counts, bucket);
                                     });
    }
}

template <typename T>
__global__ void deform_conv2d_col2im_fill(
    const long long n_items, const T* __restrict__ offset, const T* __restrict__ mask,
    const int has_mask, PYDEFORM_CONTRIBUTION_LIST_PARAMS, PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformConv2dGeometry geom = PYDEFORM_DEFORM_CONV2D_GEOMETRY;
    const ContributionLists<A> lists = PYDEFORM_CONTRIBUTION_LISTS;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        for_each_col2im_contribution(item, geom, offset, mask, has_mask,
                                     [&](const long long bucket, const int corner, const A weight) {
                                         store_contribution(lists, claim_slot(cursors, bucket),
                                                            item, corner, weight);
                                     });
    }
}


// grad_input[b, c, pixel] = sum over the sorted list of bucket (b*Goff + c/(C/Goff))*H*W + pixel
// of weight * gcol, one work item per element of grad_input (all written).
template <typename T>
__global__ void deform_conv2d_col2im_gather(
    const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
    const pydeform::acc_t<T>* __restrict__ grad_columns, pydeform::acc_t<T>* __restrict__ grad_input,
    PYDEFORM_DEFORM_CONV2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformConv2dGeometry geom = PYDEFORM_DEFORM_CONV2D_GEOMETRY;
    const long long plane_size = geom.height * geom.width;
    // Columns per channel: the work items' (kernel point, output pixel) indices.
    const long long channel_columns = geom.kernel_h * geom.kernel_w * geom.out_h * geom.out_w;
    const long long channels_per_group = geom.channels / geom.offset_groups;
    for (long long element = grid_stride_begin(); element < n_items; element += grid_stride_step()) {
        const long long pixel = element % plane_size;
        const long long plane = element / plane_size;  // b*C + c
        const long long channel = plane % geom.channels;
        const long long batch = plane / geom.channels;
        const long long bucket =
            (batch * geom.offset_groups + channel / channels_per_group) * plane_size + pixel;
        const A* columns = grad_columns + plane * channel_columns;
        A sum = A(0);
        for (long long slot = bucket_begin(bucket_ends, bucket); slot < static_cast<long long>(bucket_ends[bucket]);
             ++slot) {
            sum += contribution_weight[slot] * load_acc(columns + contribution_item[slot] % channel_columns);
        }
        grad_input[element] = sum;
    }
}
