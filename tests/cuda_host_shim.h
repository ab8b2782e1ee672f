// Force-included (g++ -include) before a CUDA C source to compile it as plain C++ for the CPU.
// A grid-stride kernel without shared memory or warp intrinsics computes every work item when it
// runs as the single thread of a single block, so that is the execution model modelled here.
#pragma once

#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct HostShimDim3 {
    unsigned int x, y, z;
};
static const HostShimDim3 threadIdx = {0, 0, 0};
static const HostShimDim3 blockIdx = {0, 0, 0};
static const HostShimDim3 blockDim = {1, 1, 1};
static const HostShimDim3 gridDim = {1, 1, 1};

// One thread: a plain read-modify-write is atomic.
template <typename A>
inline A atomicAdd(A* address, const A value) {
    const A old = *address;
    *address = old + value;
    return old;
}

template <typename I>
inline I atomicMax(I* address, const I value) {
    const I old = *address;
    *address = old < value ? value : old;
    return old;
}

#define __ldg(address) (*(address))

// One thread per block: the block's shared arrays are that thread's statics, and a barrier has
// nobody to wait for. Kernels with shared memory run correctly here only if every loop strides
// by blockDim.x (see centernet.cu).
#define __shared__ static
inline void __syncthreads() {}

// CUDA's bit reinterpretations.
inline float __int_as_float(const int bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
inline int __float_as_int(const float value) {
    int bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}
inline double __longlong_as_double(const long long bits) {
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
inline long long __double_as_longlong(const double value) {
    long long bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

// CUDA's device math overloads floor(float), max(long long, long long) etc. in the global
// namespace; round is half away from zero in both.
using std::ceil;
using std::exp;
using std::floor;
using std::fmax;
using std::fmin;
using std::isnan;
using std::log;
using std::max;
using std::min;
using std::pow;
using std::round;
using std::sqrt;
