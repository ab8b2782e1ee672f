// Host stand-in for CUDA's cuda_bf16.h, used by the CPU host shim (see cuda_host_shim.h).
// Host runs instantiate float and double only, so the conversions are declared, never called.
#pragma once

struct __nv_bfloat16 {
    unsigned short bits;
};
float __bfloat162float(__nv_bfloat16 value);
__nv_bfloat16 __float2bfloat16_rn(float value);
