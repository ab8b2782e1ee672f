// Force-included (g++ -include) before a CUDA C source to compile it as plain C++ for the CPU.
// Two execution models:
// - default: the single thread of a single block. A grid-stride kernel without shared memory or
//   warp intrinsics computes every work item that way, and so does a block kernel whose loops
//   all stride by blockDim.x and gridDim.x (shared arrays are then the one thread's own).
// - PYDEFORM_HOST_SHIM_BLOCK_THREADS: the launcher (tests/host_shim.py) runs the blocks one after
//   another, each block's threads as concurrent OS threads that meet at __syncthreads() on a
//   barrier and share the block's __shared__ arrays, so the block-cooperative code (scans, sorts,
//   reductions) really runs with several threads; atomics take a lock.
// - PYDEFORM_HOST_SHIM_SHUFFLED: the launcher runs every logical thread of the grid (block,
//   thread) as one call, in a shuffled order and on several OS threads, for grid-stride kernels
//   without __syncthreads. atomicAdd is a real lock-free read-modify-write, applied in the order
//   the threads get there, so float sums take the rounding of that order as on a GPU.
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

// Blocks run one at a time, so a block's shared arrays can be statics either way.
#define __shared__ static

#if defined(PYDEFORM_HOST_SHIM_SHUFFLED)
static thread_local HostShimDim3 threadIdx = {0, 0, 0};
static thread_local HostShimDim3 blockIdx = {0, 0, 0};
static HostShimDim3 blockDim = {1, 1, 1};
static HostShimDim3 gridDim = {1, 1, 1};

// Called once per launch, before any logical thread runs.
extern "C" void pydeform_host_configure(const unsigned int grid, const unsigned int block) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
}

// Called by an OS thread before it runs logical thread (block, thread).
extern "C" void pydeform_host_enter(const unsigned int block, const unsigned int thread) {
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
}

// Compare-and-swap on the value's bytes: integers and floats alike.
template <typename A>
inline A atomicAdd(A* address, const A value) {
    A old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    A updated = old + value;
    while (!__atomic_compare_exchange(address, &old, &updated, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED)) {
        updated = old + value;
    }
    return old;
}
#elif defined(PYDEFORM_HOST_SHIM_BLOCK_THREADS)
#include <mutex>
#include <pthread.h>

static thread_local HostShimDim3 threadIdx = {0, 0, 0};
static thread_local HostShimDim3 blockIdx = {0, 0, 0};
static HostShimDim3 blockDim = {1, 1, 1};
static HostShimDim3 gridDim = {1, 1, 1};
static pthread_barrier_t host_shim_barrier;
static bool host_shim_barrier_ready = false;
static std::mutex host_shim_atomic_lock;

// Called once per launch, before any thread enters the kernel.
extern "C" void pydeform_host_configure(const unsigned int grid, const unsigned int block) {
    if (host_shim_barrier_ready) {
        pthread_barrier_destroy(&host_shim_barrier);
    }
    pthread_barrier_init(&host_shim_barrier, nullptr, block);
    host_shim_barrier_ready = true;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
}

// Called by each launcher thread before it calls the kernel.
extern "C" void pydeform_host_enter(const unsigned int block, const unsigned int thread) {
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
}

inline void __syncthreads() { pthread_barrier_wait(&host_shim_barrier); }

template <typename A>
inline A atomicAdd(A* address, const A value) {
    const std::lock_guard<std::mutex> hold(host_shim_atomic_lock);
    const A old = *address;
    *address = old + value;
    return old;
}

template <typename I>
inline I atomicMax(I* address, const I value) {
    const std::lock_guard<std::mutex> hold(host_shim_atomic_lock);
    const I old = *address;
    *address = old < value ? value : old;
    return old;
}

template <typename I>
inline I atomicCAS(I* address, const I compare, const I value) {
    const std::lock_guard<std::mutex> hold(host_shim_atomic_lock);
    const I old = *address;
    *address = old == compare ? value : old;
    return old;
}
#else
static const HostShimDim3 threadIdx = {0, 0, 0};
static const HostShimDim3 blockIdx = {0, 0, 0};
static const HostShimDim3 blockDim = {1, 1, 1};
static const HostShimDim3 gridDim = {1, 1, 1};

// One thread: a barrier has nobody to wait for, and a plain read-modify-write is atomic.
inline void __syncthreads() {}

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

template <typename I>
inline I atomicCAS(I* address, const I compare, const I value) {
    const I old = *address;
    *address = old == compare ? value : old;
    return old;
}
#endif

#define __ldg(address) (*(address))

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

// CUDA's round-to-nearest arithmetic intrinsics, never contracted into an FMA (nor is plain
// arithmetic here: x86-64 g++ without -mfma has no FMA instruction to contract into).
inline double __dmul_rn(const double a, const double b) { return a * b; }
inline double __dadd_rn(const double a, const double b) { return a + b; }
inline double __dsub_rn(const double a, const double b) { return a - b; }
inline float __fmul_rn(const float a, const float b) { return a * b; }
inline float __fadd_rn(const float a, const float b) { return a + b; }
inline float __fsub_rn(const float a, const float b) { return a - b; }

// CUDA's device math overloads floor(float), max(long long, long long) etc. in the global
// namespace; round is half away from zero in both.
using std::ceil;
using std::exp;
using std::fabs;
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
