// The two bilinear sampling rules (A: docs/deform_conv.md, B: docs/roi.md), the only CUDA C
// implementation of them.
// A rule's set-up turns a sampling position into the four corners (h0,w0), (h0,w0+1),
// (h0+1,w0), (h0+1,w0+1) with their plane indices, validity and weights, plus the
// derivatives of the weights with respect to the position; the load / dot / scatter helpers
// below are shared by both rules. A kernel sets a position up once and then reuses the
// corners for every channel that samples there.
#pragma once

#include "common.cuh"

namespace pydeform {

template <typename A>
struct BilinearCorners {
    long long index[4];  // h * width + w of each corner; only meaningful where valid
    bool valid[4];       // corners that contribute (inside the plane, and the sample is inside)
    A weight[4];
    A weight_dh[4];      // d weight / d h
    A weight_dw[4];      // d weight / d w
    bool any_valid;
};

// One axis of a sampling position: the two neighbouring pixels and the distance from the lower.
template <typename A>
struct BilinearAxis {
    long long low, high;
    bool low_valid, high_valid;
    A fraction;  // weight of `high`; 1 - fraction is the weight of `low`
    A slope;     // d fraction / d coordinate: 1, or 0 where the rule clamped the coordinate
};

template <typename A>
__device__ __forceinline__ BilinearCorners<A> no_corners() {
    BilinearCorners<A> corners;
    for (int k = 0; k < 4; ++k) {
        corners.index[k] = 0;
        corners.valid[k] = false;
        corners.weight[k] = corners.weight_dh[k] = corners.weight_dw[k] = A(0);
    }
    corners.any_valid = false;
    return corners;
}

template <typename A>
__device__ __forceinline__ BilinearCorners<A> combine_axes(const BilinearAxis<A>& row,
                                                          const BilinearAxis<A>& col,
                                                          const long long width) {
    BilinearCorners<A> corners;
    const long long rows[4] = {row.low, row.low, row.high, row.high};
    const long long cols[4] = {col.low, col.high, col.low, col.high};
    const bool row_valid[4] = {row.low_valid, row.low_valid, row.high_valid, row.high_valid};
    const bool col_valid[4] = {col.low_valid, col.high_valid, col.low_valid, col.high_valid};
    const A row_weight[4] = {A(1) - row.fraction, A(1) - row.fraction, row.fraction, row.fraction};
    const A col_weight[4] = {A(1) - col.fraction, col.fraction, A(1) - col.fraction, col.fraction};
    const A row_sign[4] = {A(-1), A(-1), A(1), A(1)};
    const A col_sign[4] = {A(-1), A(1), A(-1), A(1)};
    corners.any_valid = false;
    for (int k = 0; k < 4; ++k) {
        corners.valid[k] = row_valid[k] && col_valid[k];
        corners.index[k] = corners.valid[k] ? rows[k] * width + cols[k] : 0;
        corners.weight[k] = row_weight[k] * col_weight[k];
        corners.weight_dh[k] = row_sign[k] * row.slope * col_weight[k];
        corners.weight_dw[k] = col_sign[k] * col.slope * row_weight[k];
        corners.any_valid = corners.any_valid || corners.valid[k];
    }
    return corners;
}

// Rule A, zero-padded: 0 outside (-1, size) (strictly), corners outside [0, size) contribute 0.
template <typename A>
__device__ __forceinline__ BilinearAxis<A> zero_padded_axis(const A coordinate, const long long size) {
    const A low = floor(coordinate);
    BilinearAxis<A> axis;
    axis.low = static_cast<long long>(low);
    axis.high = axis.low + 1;
    axis.low_valid = axis.low >= 0;
    axis.high_valid = axis.high < size;
    axis.fraction = coordinate - low;
    axis.slope = A(1);
    return axis;
}

template <typename A>
__device__ __forceinline__ BilinearCorners<A> zero_padded_corners(const A h, const A w,
                                                                 const long long height,
                                                                 const long long width) {
    // Written as a negation so that a NaN position counts as outside.
    if (!(h > A(-1) && h < A(height) && w > A(-1) && w < A(width))) {
        return no_corners<A>();
    }
    return combine_axes(zero_padded_axis(h, height), zero_padded_axis(w, width), width);
}

// Rule B, border-clamped: 0 outside [-1, size] (inclusive), the coordinate clamped into the plane.
// Where a coordinate is clamped the sample does not move with it, so its slope is 0.
template <typename A>
__device__ __forceinline__ BilinearAxis<A> border_clamped_axis(A coordinate, const long long size) {
    BilinearAxis<A> axis;
    axis.slope = A(1);
    if (coordinate <= A(0)) {  // slope 0 at the kink too, as the reference has it
        coordinate = A(0);
        axis.slope = A(0);
    }
    axis.low = static_cast<long long>(coordinate);
    if (axis.low >= size - 1) {
        axis.low = axis.high = size - 1;
        coordinate = A(axis.low);
        axis.slope = A(0);
    } else {
        axis.high = axis.low + 1;
    }
    axis.low_valid = axis.high_valid = true;
    axis.fraction = coordinate - A(axis.low);
    return axis;
}

template <typename A>
__device__ __forceinline__ BilinearCorners<A> border_clamped_corners(const A y, const A x,
                                                                    const long long height,
                                                                    const long long width) {
    if (!(y >= A(-1) && y <= A(height) && x >= A(-1) && x <= A(width))) {
        return no_corners<A>();
    }
    return combine_axes(border_clamped_axis(y, height), border_clamped_axis(x, width), width);
}

// The four corner values of one plane, 0 for the corners that do not contribute.
template <typename A, typename T>
__device__ __forceinline__ void load_corners(const BilinearCorners<A>& corners, const T* plane,
                                             A values[4]) {
    for (int k = 0; k < 4; ++k) {
        values[k] = corners.valid[k] ? A(load_acc(plane + corners.index[k])) : A(0);
    }
}

// sum_k weights[k] * values[k]: with corners.weight the sample, with weight_dh / weight_dw its
// derivatives with respect to the position.
template <typename A>
__device__ __forceinline__ A corner_dot(const A weights[4], const A values[4]) {
    return weights[0] * values[0] + weights[1] * values[1] + weights[2] * values[2] +
           weights[3] * values[3];
}

// The sampled value of one plane at a set-up position.
template <typename A, typename T>
__device__ __forceinline__ A sample_corners(const BilinearCorners<A>& corners, const T* plane) {
    A values[4];
    load_corners(corners, plane, values);
    return corner_dot(corners.weight, values);
}

// Adds weight * gradient to each contributing corner of an accumulation-type plane.
template <typename A>
__device__ __forceinline__ void scatter_corners(const BilinearCorners<A>& corners, A* plane,
                                                const A gradient) {
    for (int k = 0; k < 4; ++k) {
        if (corners.valid[k]) {
            atomic_accumulate(plane + corners.index[k], corners.weight[k] * gradient);
        }
    }
}

}  // namespace pydeform
