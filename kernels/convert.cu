/*
 * convert.cu — widening f16 storage to f32 (exact), one thread per element, grid-stride loop. CPU
 * twin: `half::f16::to_f32`; launcher: src/cuda/ops/convert.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/* f16 -> f32 (exact). */
extern "C" __global__ void convert_f16_to_f32(const unsigned short *__restrict__ src,
                                              float *__restrict__ dst, AlexnetConvertParams p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len) { dst[i] = alexnet_h2f(src[i]); }
}
