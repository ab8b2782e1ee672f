// Force-included (g++ -include) before a CUDA C source to compile it as plain C++ for the CPU.
// A grid-stride kernel without shared memory or warp intrinsics computes every work item when it
// runs as the single thread of a single block, so that is the execution model modelled here.
#pragma once

#include <cmath>

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

#define __ldg(address) (*(address))

// CUDA's device math overloads floor(float), max(long long, long long) etc. in the global
// namespace; round is half away from zero in both.
using std::ceil;
using std::floor;
using std::max;
using std::min;
using std::round;
