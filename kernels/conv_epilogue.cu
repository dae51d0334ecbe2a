/*
 * conv_epilogue.cu — bias, ReLU, optional LRN and max-pooling after a convolution, in one pass
 * (see AlexnetConvEpilogueParams). CPU twin: the CPU's same stages combined (`cpu::bias_act`,
 * `cpu::Lrn`, `cpu::MaxPool2d`); launcher: src/cuda/ops/conv_epilogue.rs.
 *
 * Separately these are three kernels and two full-size intermediate tensors written and read
 * back (for conv1 of a batch of 128: 2 x 37 MB in f32). Here each thread reads the raw
 * convolution output around its pooling window and writes one pooled value.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"
#include "alexnet_lrn.cuh"

/* A value as the separate kernels leave it in memory: rounded to T (the identity for f32). */
template <typename T> static __device__ __forceinline__ float alexnet_round(float v)
{
    return alexnet_load(alexnet_store<T>(v));
}

/* relu(src + bias[c]) at element (n, c, y, x), rounded to T like bias_act's output. */
template <typename T, typename I>
static __device__ __forceinline__ float biased(const T *__restrict__ src, const T *__restrict__ bias,
                                               const AlexnetTensorShape &s, I n, I c, I y, I x)
{
    const float v = alexnet_load(src[alexnet_offset<I>(n, c, y, x, s.c, s.h, s.w, s.layout)]) +
                    alexnet_load(bias[c]);
    return alexnet_round<T>(alexnet_relu(v));
}

/* The LRN of channel c at (n, y, x), as lrn.cu computes it (alexnet_lrn.cuh). */
template <typename T, typename I>
static __device__ __forceinline__ float normalised(const T *__restrict__ src,
                                                   const T *__restrict__ bias,
                                                   const AlexnetLrnParams &p, I n, I c, I y, I x)
{
    unsigned int first, last;
    alexnet_lrn_window((unsigned int)c, p, first, last);
    float sum = 0.0f;
    for (unsigned int j = first; j <= last; ++j) {
        const float a = biased<T, I>(src, bias, p.shape, n, (I)j, y, x);
        sum = __fadd_rn(sum, __fmul_rn(a, a));
    }
    const float a = biased<T, I>(src, bias, p.shape, n, c, y, x);
    return alexnet_round<T>(alexnet_lrn_value(a, sum, p));
}

template <typename T, typename I>
static __device__ __forceinline__ void conv_epilogue(const T *__restrict__ src,
                                                     const T *__restrict__ bias,
                                                     T *__restrict__ dst,
                                                     const AlexnetConvEpilogueParams &p, I total)
{
    const AlexnetTensorShape s = p.pool.in;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        I n, c, oy, ox;
        alexnet_unravel<I>(i, s.c, p.pool.out_h, p.pool.out_w, s.layout, n, c, oy, ox);
        const I y0 = oy * p.pool.stride;
        const I x0 = ox * p.pool.stride;
        float m = __int_as_float(0xff800000); /* -infinity */
        for (unsigned int ky = 0; ky < p.pool.kernel; ++ky) {
            for (unsigned int kx = 0; kx < p.pool.kernel; ++kx) {
                const I y = y0 + ky, x = x0 + kx;
                const float v = p.has_lrn ? normalised<T, I>(src, bias, p.lrn, n, c, y, x)
                                          : biased<T, I>(src, bias, s, n, c, y, x);
                if (v > m || alexnet_isnan(v))
                    m = v;
            }
        }
        dst[i] = alexnet_store<T>(m);
    }
}

template <typename T>
static __device__ __forceinline__ void conv_epilogue_dispatch(const T *src, const T *bias, T *dst,
                                                              const AlexnetConvEpilogueParams &p)
{
    const unsigned long long in_total = alexnet_numel(p.pool.in);
    const unsigned long long total =
        (unsigned long long)p.pool.in.n * p.pool.in.c * p.pool.out_h * p.pool.out_w;
    if (alexnet_fits_u32(in_total > total ? in_total : total))
        conv_epilogue<T, unsigned int>(src, bias, dst, p, (unsigned int)total);
    else
        conv_epilogue<T, unsigned long long>(src, bias, dst, p, total);
}

/* The convolution epilogue on f32 activations. */
extern "C" __global__ void conv_epilogue_f32(const float *src, const float *bias, float *dst,
                                             AlexnetConvEpilogueParams p)
{
    conv_epilogue_dispatch<float>(src, bias, dst, p);
}

/* The convolution epilogue on f16 activations (f32 arithmetic, rounded where the separate
 * kernels store). */
extern "C" __global__ void conv_epilogue_f16(const unsigned short *src, const unsigned short *bias,
                                             unsigned short *dst, AlexnetConvEpilogueParams p)
{
    conv_epilogue_dispatch<unsigned short>(src, bias, dst, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void conv_epilogue_bf16(const alexnet_bf16 *src, const alexnet_bf16 *bias,
                                              alexnet_bf16 *dst, AlexnetConvEpilogueParams p)
{
    conv_epilogue_dispatch<alexnet_bf16>(src, bias, dst, p);
}
