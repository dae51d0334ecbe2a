/*
 * convert.cu — between f16 or bf16 and f32 storage with a scale (see AlexnetConvertParams), one
 * thread per element, grid-stride loop. CPU twins: `half::f16::to_f32` / `half::f16::from_f32`
 * (and `half::bf16`'s) of the f32 product; launcher: src/cuda/ops/convert.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/* 16-bit storage T -> f32, times scale; scale 1 skips the multiply: the widening is exact for
 * every value but NaN, which stays NaN (whether the hardware keeps its payload is not relied on:
 * the host emulation keeps it, and the tests compare any NaN with any NaN). */
template <typename T>
static __device__ __forceinline__ void widen(const T *__restrict__ src, float *__restrict__ dst,
                                             const AlexnetConvertParams &p)
{
    const bool unscaled = p.scale == 1.0f;
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        const float v = alexnet_load(src[i]);
        dst[i] = unscaled ? v : __fmul_rn(v, p.scale);
    }
}

/* f32 times scale -> 16-bit storage T, one rounding (to nearest even) of the f32 product; the
 * scale from `settings` when given (the loss scale of a captured training step). */
template <typename T>
static __device__ __forceinline__ void narrow(const float *__restrict__ src, T *__restrict__ dst,
                                              const AlexnetStepSettings *settings,
                                              const AlexnetConvertParams &p)
{
    const float scale = settings != 0 ? settings->loss_scale : p.scale;
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        dst[i] = alexnet_store<T>(__fmul_rn(src[i], scale));
    }
}

extern "C" __global__ void convert_f16_to_f32(const unsigned short *__restrict__ src,
                                              float *__restrict__ dst, AlexnetConvertParams p)
{
    widen<unsigned short>(src, dst, p);
}

extern "C" __global__ void convert_f32_to_f16(const float *__restrict__ src,
                                              unsigned short *__restrict__ dst,
                                              const AlexnetStepSettings *settings,
                                              AlexnetConvertParams p)
{
    narrow<unsigned short>(src, dst, settings, p);
}

extern "C" __global__ void convert_bf16_to_f32(const alexnet_bf16 *__restrict__ src,
                                               float *__restrict__ dst, AlexnetConvertParams p)
{
    widen<alexnet_bf16>(src, dst, p);
}

extern "C" __global__ void convert_f32_to_bf16(const float *__restrict__ src,
                                               alexnet_bf16 *__restrict__ dst,
                                               const AlexnetStepSettings *settings,
                                               AlexnetConvertParams p)
{
    narrow<alexnet_bf16>(src, dst, settings, p);
}
