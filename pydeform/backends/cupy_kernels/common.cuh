// Shared device helpers of the CuPy RawKernel sources: the accumulation type of each
// storage type, conversions between them, atomic accumulation and the grid-stride loop.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// The threads of every block a launch runs, THREADS_PER_BLOCK of _compile.py, which compiles the
// sources with this define: the one number that sizes the shared per-thread arrays too.
#ifndef PYDEFORM_THREADS_PER_BLOCK
#error "compile with -DPYDEFORM_THREADS_PER_BLOCK=<threads per block>, as _compile.py does"
#endif

namespace pydeform {

constexpr int kThreadsPerBlock = PYDEFORM_THREADS_PER_BLOCK;
static_assert(kThreadsPerBlock >= 1 && kThreadsPerBlock <= 1024, "a CUDA block has 1 to 1024 threads");

// Arithmetic happens in float for float16 / bfloat16 / float32 and in double for double.
template <typename T> struct AccumulationType { using type = float; };
template <> struct AccumulationType<double> { using type = double; };
template <typename T> using acc_t = typename AccumulationType<T>::type;

__device__ __forceinline__ float to_acc(const float value) { return value; }
__device__ __forceinline__ double to_acc(const double value) { return value; }
__device__ __forceinline__ float to_acc(const __half value) { return __half2float(value); }
__device__ __forceinline__ float to_acc(const __nv_bfloat16 value) { return __bfloat162float(value); }

// Loads through the read-only data cache: every kernel input is read-only for the whole launch.
template <typename T>
__device__ __forceinline__ acc_t<T> load_acc(const T* address) { return to_acc(__ldg(address)); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> value);
template <> __device__ __forceinline__ float from_acc<float>(const float value) { return value; }
template <> __device__ __forceinline__ double from_acc<double>(const double value) { return value; }
template <> __device__ __forceinline__ __half from_acc<__half>(const float value) {
    return __float2half_rn(value);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(const float value) {
    return __float2bfloat16_rn(value);
}

// Scatter targets are always in the accumulation type, so only float and double atomics are needed.
__device__ __forceinline__ void atomic_accumulate(float* address, const float value) {
    atomicAdd(address, value);
}
__device__ __forceinline__ void atomic_accumulate(double* address, const double value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
    // No atomicAdd(double*, double) before compute_60: add to the value last seen and swap the
    // bits in if nobody changed them meanwhile, else retry with what they changed them to
    // (compared as integers, so a NaN cannot keep the loop going).
    unsigned long long* const bits = reinterpret_cast<unsigned long long*>(address);
    unsigned long long seen = *bits;
    unsigned long long expected;
    do {
        expected = seen;
        const double sum = __longlong_as_double(static_cast<long long>(expected)) + value;
        seen = atomicCAS(bits, expected, static_cast<unsigned long long>(__double_as_longlong(sum)));
    } while (seen != expected);
#else
    atomicAdd(address, value);
#endif
}

// Grid-stride loop bounds, 64-bit so that work-item counts may pass 2**31 - 1:
//   for (long long item = grid_stride_begin(); item < n_items; item += grid_stride_step())
__device__ __forceinline__ long long grid_stride_begin() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride_step() {
    return static_cast<long long>(blockDim.x) * gridDim.x;
}

}  // namespace pydeform
