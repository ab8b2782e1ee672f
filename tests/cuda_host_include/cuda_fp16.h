// Host stand-in for CUDA's cuda_fp16.h, used by the CPU host shim (see cuda_host_shim.h).
// Host runs instantiate float and double only, so the conversions are declared, never called.
#pragma once

struct __half {
    unsigned short bits;
};
float __half2float(__half value);
__half __float2half_rn(float value);
