// Dense deformable pooling (docs/deform_unet.md): the forward (avg / max with the arg-max kernel
// point), the input gradient and the offset / mask gradients.
//
// Items: an output element (b, c, p) pools the kh*kw rule-A samples of channel c at output
// pixel p = y*Wo + x; a sample ((b*Goff + g)*kh*kw + k)*Ho*Wo + p is one kernel point of one
// offset group, shared by the group's channels. `offset` is [B, 2*Goff*kh*kw, Ho, Wo] (dy then dx
// per kernel point), `mask` [B, Goff*kh*kw, Ho, Wo] or null when has_mask == 0 (m = 1), `indices`
// int32 [B, C, Ho, Wo] or null.

#include "common.cuh"
#include "bilinear.cuh"
#include "contributions.cuh"

namespace pydeform {

struct DeformPool2dGeometry {
    long long channels, height, width;
    long long kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
    long long offset_groups, out_h, out_w;
};

// The geometry travels as flat scalars in this order in every kernel of this file; the Python
// side builds the same list in one function.
#define PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS                                                   \
    const long long channels, const long long height, const long long width,                    \
        const long long kernel_h, const long long kernel_w, const long long stride_h,           \
        const long long stride_w, const long long pad_h, const long long pad_w,                 \
        const long long dilation_h, const long long dilation_w, const long long offset_groups,  \
        const long long out_h, const long long out_w
#define PYDEFORM_DEFORM_POOL2D_GEOMETRY                                                          \
    pydeform::DeformPool2dGeometry {                                                            \
        channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,          \
            dilation_h, dilation_w, offset_groups, out_h, out_w                                 \
    }

// Kernel point k of offset group g at output pixel p of image b.
template <typename A>
struct DeformPool2dPoint {
    BilinearCorners<A> corners;  // rule A set-up of the sampling position
    A modulation;                // m, 1 without a mask
    long long offset_index;      // offset element of dy; dx is out_h*out_w further
    long long mask_index;        // mask element of m
};

template <typename T>
__device__ __forceinline__ DeformPool2dPoint<acc_t<T>> deform_pool2d_point(
    const long long b, const long long g, const long long k, const long long p,
    const DeformPool2dGeometry& geom, const T* __restrict__ offset, const T* __restrict__ mask,
    const int has_mask) {
    using A = acc_t<T>;
    const long long pixels = geom.out_h * geom.out_w;
    const long long point_row = (b * geom.offset_groups + g) * geom.kernel_h * geom.kernel_w + k;
    const long long i = k / geom.kernel_w, j = k % geom.kernel_w;
    const long long y = p / geom.out_w, x = p % geom.out_w;
    DeformPool2dPoint<A> point;
    point.offset_index = 2 * point_row * pixels + p;
    point.mask_index = point_row * pixels + p;
    point.modulation = has_mask ? A(load_acc(mask + point.mask_index)) : A(1);
    const A h = A(y * geom.stride_h - geom.pad_h + i * geom.dilation_h) + A(load_acc(offset + point.offset_index));
    const A w = A(x * geom.stride_w - geom.pad_w + j * geom.dilation_w) +
                A(load_acc(offset + point.offset_index + pixels));
    point.corners = zero_padded_corners(h, w, geom.height, geom.width);
    return point;
}

// Output element `item` = (b*C + c)*Ho*Wo + p: its image b, offset group g and pixel p.
struct DeformPool2dElement {
    long long b, g, p, plane;  // plane: b*C + c
};

__device__ __forceinline__ DeformPool2dElement deform_pool2d_element(const long long item,
                                                                     const DeformPool2dGeometry& geom) {
    DeformPool2dElement element;
    const long long pixels = geom.out_h * geom.out_w;
    element.plane = item / pixels;
    element.p = item % pixels;
    element.b = element.plane / geom.channels;
    element.g = (element.plane % geom.channels) / (geom.channels / geom.offset_groups);
    return element;
}

// Adds m * corner weight * gradient of kernel point k's sample to the element's input plane.
template <typename T>
__device__ __forceinline__ void deform_pool2d_scatter(const DeformPool2dElement& element, const long long k,
                                                      const DeformPool2dGeometry& geom,
                                                      const T* __restrict__ offset, const T* __restrict__ mask,
                                                      const int has_mask, const acc_t<T> gradient,
                                                      acc_t<T>* __restrict__ grad_input) {
    const auto point = deform_pool2d_point(element.b, element.g, k, element.p, geom, offset, mask, has_mask);
    if (point.corners.any_valid) {
        scatter_corners(point.corners, grad_input + element.plane * geom.height * geom.width,
                        point.modulation * gradient);
    }
}

}  // namespace pydeform

// output[item] = the avg or max of the element's kh*kw samples; indices[item] (when has_indices)
// = the arg-max kernel point (ties: the lowest; a NaN sample wins over any number). Every
// element written.
template <typename T>
__global__ void deform_pool2d_forward(const long long n_items, const T* __restrict__ input,
                                      const T* __restrict__ offset, const T* __restrict__ mask,
                                      const int has_mask, T* __restrict__ output, int* __restrict__ indices,
                                      const int has_indices, const int max_mode,
                                      PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformPool2dGeometry geom = PYDEFORM_DEFORM_POOL2D_GEOMETRY;
    const long long points = kernel_h * kernel_w;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const DeformPool2dElement element = deform_pool2d_element(item, geom);
        const T* plane = input + element.plane * height * width;
        A result = A(0);
        int arg = 0;
        for (long long k = 0; k < points; ++k) {
            const auto point = deform_pool2d_point(element.b, element.g, k, element.p, geom, offset, mask, has_mask);
            const A value = point.corners.any_valid ? point.modulation * sample_corners(point.corners, plane) : A(0);
            if (!max_mode) {
                result += value;
            } else if (k == 0 || value > result || (value != value && result == result)) {
                result = value;
                arg = static_cast<int>(k);
            }
        }
        output[item] = from_acc<T>(max_mode ? result : result / A(points));
        if (has_indices) {
            indices[item] = arg;
        }
    }
}

// grad_input (zero-filled by the caller, accumulation type) += the element's gradient through
// every sample (avg, divided by kh*kw) or through its arg-max sample (max; an index outside
// [0, kh*kw) routes nothing).
template <typename T>
__global__ void deform_pool2d_backward_input(const long long n_items, const T* __restrict__ offset,
                                             const T* __restrict__ mask, const int has_mask,
                                             const T* __restrict__ grad_output, const int* __restrict__ indices,
                                             const int max_mode, pydeform::acc_t<T>* __restrict__ grad_input,
                                             PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformPool2dGeometry geom = PYDEFORM_DEFORM_POOL2D_GEOMETRY;
    const long long points = kernel_h * kernel_w;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const DeformPool2dElement element = deform_pool2d_element(item, geom);
        const A grad = load_acc(grad_output + item);
        if (max_mode) {
            const long long k = indices[item];
            if (k >= 0 && k < points) {
                deform_pool2d_scatter(element, k, geom, offset, mask, has_mask, grad, grad_input);
            }
        } else {
            for (long long k = 0; k < points; ++k) {
                deform_pool2d_scatter(element, k, geom, offset, mask, has_mask, grad / A(points), grad_input);
            }
        }
    }
}

// The deterministic input gradient (contributions.cuh). The contribution lists are deform_conv2d's
// deterministic col2im lists on the same samples (deform_conv.cu's count, fill and sort, run on the
// depthwise geometry): buckets (b*Goff + g)*H*W + pixel, items the samples
// ((b*Goff + g)*kh*kw + k)*Ho*Wo + p, weights m * corner weight. grad_input[b, c, pixel] = sum
// over the sorted list of its bucket of weight * the element (b, c, p)'s gradient through
// sample k (avg: grad / (kh*kw); max: grad where the element's arg-max is k, else nothing). One
// work item per element of grad_input (all written).
template <typename T>
__global__ void deform_pool2d_backward_input_gather(const long long n_items, PYDEFORM_SORTED_LIST_PARAMS,
                                                    const T* __restrict__ grad_output,
                                                    const int* __restrict__ indices, const int max_mode,
                                                    pydeform::acc_t<T>* __restrict__ grad_input,
                                                    PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformPool2dGeometry geom = PYDEFORM_DEFORM_POOL2D_GEOMETRY;
    const long long plane_size = geom.height * geom.width;
    const long long pixels = geom.out_h * geom.out_w;
    const long long points = geom.kernel_h * geom.kernel_w;
    const long long per_group = geom.channels / geom.offset_groups;
    for (long long element = grid_stride_begin(); element < n_items; element += grid_stride_step()) {
        const long long pixel = element % plane_size;
        const long long plane = element / plane_size;  // b*C + c
        const long long channel = plane % geom.channels;
        const long long bucket =
            ((plane / geom.channels) * geom.offset_groups + channel / per_group) * plane_size + pixel;
        const T* grads = grad_output + plane * pixels;
        A sum = A(0);
        for (long long slot = bucket_begin(bucket_ends, bucket); slot < static_cast<long long>(bucket_ends[bucket]);
             ++slot) {
            const long long p = contribution_item[slot] % pixels;
            if (!max_mode) {
                sum += contribution_weight[slot] * (A(load_acc(grads + p)) / A(points));
            } else if (indices[plane * pixels + p] == (contribution_item[slot] / pixels) % points) {
                sum += contribution_weight[slot] * A(load_acc(grads + p));
            }
        }
        grad_input[element] = sum;
    }
}

// grad_offset = m * sum_c gcol * dB_A/dh (dw), grad_mask = sum_c gcol * B_A over the channels of the
// sample's offset group that route gradient through it (gcol = grad / (kh*kw) in avg mode, grad
// where the channel's arg-max is this point in max mode; 0 when none does). Every element written.
template <typename T>
__global__ void deform_pool2d_backward_coord(const long long n_items, const T* __restrict__ input,
                                             const T* __restrict__ offset, const T* __restrict__ mask,
                                             const int has_mask, const T* __restrict__ grad_output,
                                             const int* __restrict__ indices, const int max_mode,
                                             T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                             PYDEFORM_DEFORM_POOL2D_GEOMETRY_PARAMS) {
    using namespace pydeform;
    using A = acc_t<T>;
    const DeformPool2dGeometry geom = PYDEFORM_DEFORM_POOL2D_GEOMETRY;
    const long long pixels = out_h * out_w;
    const long long points = kernel_h * kernel_w;
    const long long per_group = channels / offset_groups;
    for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step()) {
        const long long p = item % pixels;
        const long long point_row = item / pixels;
        const long long k = point_row % points;
        const long long group_row = point_row / points;  // b*Goff + g
        const long long b = group_row / offset_groups, g = group_row % offset_groups;
        const auto point = deform_pool2d_point(b, g, k, p, geom, offset, mask, has_mask);
        A grad_h = A(0), grad_w = A(0), grad_modulation = A(0);
        bool routed = false;
        for (long long c = g * per_group; c < (g + 1) * per_group; ++c) {
            const long long out_index = (b * channels + c) * pixels + p;
            if (max_mode && indices[out_index] != k) {
                continue;
            }
            const A grad = max_mode ? A(load_acc(grad_output + out_index))
                                    : A(load_acc(grad_output + out_index)) / A(points);
            routed = true;
            if (point.corners.any_valid) {
                A corner_values[4];
                load_corners(point.corners, input + (b * channels + c) * height * width, corner_values);
                grad_h += grad * corner_dot(point.corners.weight_dh, corner_values);
                grad_w += grad * corner_dot(point.corners.weight_dw, corner_values);
                grad_modulation += grad * corner_dot(point.corners.weight, corner_values);
            }
        }
        const A scale = routed ? point.modulation : A(0);
        grad_offset[point.offset_index] = from_acc<T>(scale * grad_h);
        grad_offset[point.offset_index + pixels] = from_acc<T>(scale * grad_w);
        if (has_mask) {
            grad_mask[point.mask_index] = from_acc<T>(grad_modulation);
        }
    }
}
