/*
 * elementwise.cu — bias + ReLU, dropout and f32 <-> f16 conversion: one thread per element,
 * grid-stride loops (any grid size is correct).
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/* x[i] += bias[(i / inner) % channels], then ReLU (NaN kept) if p.relu != 0. In place. */
template <typename T, typename I>
static __device__ __forceinline__ void bias_act(T *__restrict__ x, const T *__restrict__ bias,
                                                const AlexnetBiasActParams &p)
{
    ALEXNET_GRID_STRIDE(I, i, p.len)
    {
        const I outer = p.inner == 1 ? i : i / p.inner;
        float v = alexnet_load(x[i]) + alexnet_load(bias[outer % p.channels]);
        if (p.relu)
            v = alexnet_relu(v);
        x[i] = alexnet_store<T>(v);
    }
}

template <typename T>
static __device__ __forceinline__ void bias_act_dispatch(T *x, const T *bias,
                                                         const AlexnetBiasActParams &p)
{
    if (alexnet_fits_u32(p.len))
        bias_act<T, unsigned int>(x, bias, p);
    else
        bias_act<T, unsigned long long>(x, bias, p);
}

/* Bias + optional ReLU on f32 activations. */
extern "C" __global__ void bias_act_f32(float *x, const float *bias, AlexnetBiasActParams p)
{
    bias_act_dispatch<float>(x, bias, p);
}

/* Bias + optional ReLU on f16 activations (f32 arithmetic, one rounding). */
extern "C" __global__ void bias_act_f16(unsigned short *x, const unsigned short *bias,
                                        AlexnetBiasActParams p)
{
    bias_act_dispatch<unsigned short>(x, bias, p);
}

/*
 * The CPU's `cpu::keep_draw` (splitmix64's finaliser over seed * golden + index + golden),
 * bit for bit, so both backends draw the same mask from a seed.
 */
static __device__ __forceinline__ unsigned int alexnet_keep_draw(unsigned long long seed,
                                                                 unsigned long long index)
{
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + index + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (unsigned int)((z ^ (z >> 31)) >> 32);
}

/* Training-mode dropout in place: keep (x * scale) when draw >= threshold, else 0. */
template <typename T>
static __device__ __forceinline__ void dropout(T *x, const AlexnetDropoutParams &p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        const bool keep = alexnet_keep_draw(p.seed, i) >= p.threshold;
        x[i] = alexnet_store<T>(keep ? alexnet_load(x[i]) * p.scale : 0.0f);
    }
}

/* Dropout on f32 activations. */
extern "C" __global__ void dropout_f32(float *x, AlexnetDropoutParams p) { dropout<float>(x, p); }

/* Dropout on f16 activations. */
extern "C" __global__ void dropout_f16(unsigned short *x, AlexnetDropoutParams p)
{
    dropout<unsigned short>(x, p);
}

/* f32 -> f16, round to nearest even. */
extern "C" __global__ void convert_f32_to_f16(const float *__restrict__ src,
                                              unsigned short *__restrict__ dst,
                                              AlexnetConvertParams p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len) { dst[i] = alexnet_f2h(src[i]); }
}

/* f16 -> f32 (exact). */
extern "C" __global__ void convert_f16_to_f32(const unsigned short *__restrict__ src,
                                              float *__restrict__ dst, AlexnetConvertParams p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len) { dst[i] = alexnet_h2f(src[i]); }
}
